"""Content-frame projection: a per-pixel softmax-over-time weighted sum of the frames (CMD Eq. 3).

    xbar[b, c, h, w] = sum_l softmax_l(logits[b, :, c, h, w])[l] * frames[b, l, c, h, w]

The softmax is computed in fp32 whatever the input dtype; the result has the frames' dtype. -inf logits
(masked frames) weigh 0; a pixel whose logits are all -inf is NaN, as torch.softmax (``content_frame``).

Triton kernels: the forward reads each frame and logit once, a (BLOCK_L x BLOCK_P) tile of time x
pixels at a time, with an online softmax across time blocks (any L); the backward recomputes the
softmax and writes both gradients in one pass,

    d frames[l] = w_l * g,    d logits[l] = w_l * (frames[l] - xbar) * g,    w = softmax(logits).

The op is memory-bound (about one FLOP per byte): what matters is one read of each input, fp32 math
in registers, and coalesced, vectorised access (a flat pixel index when the C, H, W axes are dense).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from cmd_kernels._dispatch import use_triton
from cmd_kernels._triton import (GRID_BUCKET, INTERPRETED, MAX, SUM, Launch, autotune, check_same_device, empty,
                             grid_bucket, grid_configs, interpret_block, launch_context, next_pow2, pick)

MAX_BLOCK_L = 16  # time steps per tile; longer videos loop with an online softmax


def content_frame_reference(frames: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """PyTorch reference. frames, logits: (B, L, C, H, W) -> (B, C, H, W)."""
    weights = torch.softmax(logits.float(), dim=1)
    return (weights * frames.float()).sum(dim=1).to(frames.dtype)


def content_frame_backward_reference(
    grad: torch.Tensor, frames: torch.Tensor, logits: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of the reference in fp32: (d frames, d logits) in the inputs' dtypes."""
    w = torch.softmax(logits.float(), dim=1)
    f, g = frames.float(), grad.float()[:, None]
    out = (w * f).sum(dim=1, keepdim=True)
    return (w * g).to(frames.dtype), (w * (f - out) * g).to(logits.dtype)


# ----------------------------------------------------------------------------------------- kernels

def _keep(kw, warps):
    # At most 64 fp32 values per thread per (BLOCK_L x BLOCK_P) tile: more spills registers.
    return MAX_BLOCK_L * kw["BLOCK_P"] // (32 * warps) <= 64


@triton.jit
def _pixel_offset(p, H, W, s_c, s_h, s_w, FLAT: tl.constexpr):
    """Memory offset of flat pixel index p = (c * H + h) * W + w in a (C, H, W) view of strides
    (s_c, s_h, s_w). FLAT (dense view): p itself, so loads vectorise."""
    if FLAT:
        off = p
    else:
        off = (p // W // H) * s_c + (p // W % H) * s_h + (p % W) * s_w
    return off


def _cfg(block_p, warps, stages):
    return {"BLOCK_P": block_p}, warps, stages


_FWD_CONFIGS = grid_configs({"BLOCK_P": [128, 256, 512, 1024]}, num_warps=[2, 4, 8], num_stages=[1, 2], keep=_keep)
_FWD_SPACE = {"full": _FWD_CONFIGS,
              "fast": pick(_FWD_CONFIGS, _cfg(512, 4, 1), _cfg(1024, 8, 1), _cfg(256, 4, 2), _cfg(512, 8, 2)),
              "off": pick(_FWD_CONFIGS, _cfg(512, 4, 1))}


@autotune(key=["L", "P", "BLOCK_L", "FLAT", GRID_BUCKET], configs=_FWD_CONFIGS,
          space=lambda args, mode: _FWD_SPACE[mode])
@triton.jit(do_not_specialize=[GRID_BUCKET])
def _content_frame_fwd_kernel(
    f_ptr, x_ptr, out_ptr,
    L, P, H, W, GRID_BUCKET,
    f_sb, f_sl, f_sc, f_sh, f_sw,
    x_sb, x_sl, x_sc, x_sh, x_sw,
    FLAT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    f_base = f_ptr + b * f_sb + _pixel_offset(p, H, W, f_sc, f_sh, f_sw, FLAT)[None, :]
    x_base = x_ptr + b * x_sb + _pixel_offset(p, H, W, x_sc, x_sh, x_sw, FLAT)[None, :]

    m = tl.full([BLOCK_P], float("-inf"), tl.float32)  # running max of log2-scaled logits
    s = tl.full([BLOCK_P], 0.0, tl.float32)  # running sum of exp2(logit - m)
    acc = tl.full([BLOCK_P], 0.0, tl.float32)  # running sum of exp2(logit - m) * frame
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        lmask = l < L
        mask = lmask[:, None] & pmask[None, :]
        x = tl.load(x_base + l[:, None] * x_sl, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
        x = tl.where(lmask[:, None], x, float("-inf"))  # padded time steps weigh nothing
        f = tl.load(f_base + l[:, None] * f_sl, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.reduce(x, 0, MAX))
        # Safe max (FlashAttention's trick): where every logit so far is -inf (a masked run of frames),
        # m_new is -inf and exp2(-inf - -inf) would be NaN. Subtracting 0 there instead gives
        # alpha = e = exp2(-inf) = 0: the sums stay 0 until a finite logit comes, then continue exactly.
        # One select per pixel per time block, not per element. All L logits -inf: 0 / 0 = NaN, as
        # torch.softmax.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        e = tl.exp2(x - m_safe[None, :])
        s = s * alpha + tl.reduce(e, 0, SUM)
        acc = acc * alpha + tl.reduce(e * f, 0, SUM)
        m = m_new
    out = acc / s
    tl.store(out_ptr + b * P + p, out.to(out_ptr.dtype.element_ty), mask=pmask)


_BWD_CONFIGS = grid_configs({"BLOCK_P": [128, 256, 512]}, num_warps=[2, 4, 8], num_stages=[1, 2], keep=_keep)
_BWD_SPACE = {"full": _BWD_CONFIGS,
              "fast": pick(_BWD_CONFIGS, _cfg(256, 4, 1), _cfg(512, 8, 1), _cfg(128, 2, 2)),
              "off": pick(_BWD_CONFIGS, _cfg(256, 4, 1))}


@autotune(key=["L", "P", "BLOCK_L", "FLAT", GRID_BUCKET], configs=_BWD_CONFIGS,
          space=lambda args, mode: _BWD_SPACE[mode])
@triton.jit(do_not_specialize=[GRID_BUCKET])
def _content_frame_bwd_kernel(
    f_ptr, x_ptr, g_ptr, df_ptr, dx_ptr,
    L, P, H, W, GRID_BUCKET,
    f_sb, f_sl, f_sc, f_sh, f_sw,
    x_sb, x_sl, x_sc, x_sh, x_sw,
    g_sb, g_sc, g_sh, g_sw,
    FLAT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    f_base = f_ptr + b * f_sb + _pixel_offset(p, H, W, f_sc, f_sh, f_sw, FLAT)[None, :]
    x_base = x_ptr + b * x_sb + _pixel_offset(p, H, W, x_sc, x_sh, x_sw, FLAT)[None, :]
    g = tl.load(g_ptr + b * g_sb + _pixel_offset(p, H, W, g_sc, g_sh, g_sw, FLAT), mask=pmask, other=0.0)
    g = g.to(tl.float32)
    # Gradients are written dense, (B, L, C, H, W) contiguous.
    df_base = df_ptr + b * L * P + p[None, :]
    dx_base = dx_ptr + b * L * P + p[None, :]

    if L <= BLOCK_L:
        # The whole time axis fits one tile: read the inputs once, softmax directly.
        l = tl.arange(0, BLOCK_L)
        lmask = l < L
        mask = lmask[:, None] & pmask[None, :]
        x = tl.load(x_base + l[:, None] * x_sl, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
        x = tl.where(lmask[:, None], x, float("-inf"))
        f = tl.load(f_base + l[:, None] * f_sl, mask=mask, other=0.0).to(tl.float32)
        # One tile, one max: it is finite unless all L logits are -inf (then NaN, as torch.softmax).
        e = tl.exp2(x - tl.reduce(x, 0, MAX)[None, :])
        w = e / tl.reduce(e, 0, SUM)[None, :]
        out = tl.reduce(w * f, 0, SUM)
        wg = w * g[None, :]
        tl.store(df_base + l[:, None] * P, wg.to(df_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_base + l[:, None] * P, (wg * (f - out[None, :])).to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: softmax statistics and the fp32 content frame (online over time blocks).
        m = tl.full([BLOCK_P], float("-inf"), tl.float32)
        s = tl.full([BLOCK_P], 0.0, tl.float32)
        acc = tl.full([BLOCK_P], 0.0, tl.float32)
        for l0 in range(0, L, BLOCK_L):
            l = l0 + tl.arange(0, BLOCK_L)
            lmask = l < L
            mask = lmask[:, None] & pmask[None, :]
            x = tl.load(x_base + l[:, None] * x_sl, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
            x = tl.where(lmask[:, None], x, float("-inf"))
            f = tl.load(f_base + l[:, None] * f_sl, mask=mask, other=0.0).to(tl.float32)
            m_new = tl.maximum(m, tl.reduce(x, 0, MAX))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # as in the forward: -inf runs
            alpha = tl.exp2(m - m_safe)
            e = tl.exp2(x - m_safe[None, :])
            s = s * alpha + tl.reduce(e, 0, SUM)
            acc = acc * alpha + tl.reduce(e * f, 0, SUM)
            m = m_new
        out = acc / s
        inv_s = 1.0 / s
        # Pass 2: the weights and both gradients. m is the final max, finite unless all L logits are
        # -inf (NaN then, as torch.softmax); a -inf logit gets weight exp2(-inf) = 0, so zero gradients.
        for l0 in range(0, L, BLOCK_L):
            l = l0 + tl.arange(0, BLOCK_L)
            lmask = l < L
            mask = lmask[:, None] & pmask[None, :]
            x = tl.load(x_base + l[:, None] * x_sl, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
            f = tl.load(f_base + l[:, None] * f_sl, mask=mask, other=0.0).to(tl.float32)
            wg = tl.exp2(x - m[None, :]) * (inv_s * g)[None, :]
            tl.store(df_base + l[:, None] * P, wg.to(df_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_base + l[:, None] * P, (wg * (f - out[None, :])).to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------- launchers

def _flat(*tensors: torch.Tensor) -> bool:
    """True when every tensor's (C, H, W) axes are dense: pixel p sits at offset p (vector loads)."""
    for t in tensors:
        c, h, w = t.shape[-3:]
        st = t.stride()[-3:]
        if (w > 1 and st[2] != 1) or (h > 1 and st[1] != w) or (c > 1 and st[0] != h * w):
            return False
    return True


def _block_l(L: int) -> int:
    return min(next_pow2(L), MAX_BLOCK_L)


def _meta(P: int) -> dict:
    """Launch meta-parameters besides the autotuned ones: in the interpreter, a pixel block covering
    up to 4096 pixels (a small model's frame in one program per sample)."""
    return {"BLOCK_P": interpret_block(P, 4096), "num_warps": 4} if INTERPRETED else {}


def _forward_launch(frames: torch.Tensor, logits: torch.Tensor) -> Tuple[Launch, torch.Tensor]:
    B, L, C, H, W = frames.shape
    P = C * H * W
    out = empty((B, C, H, W), frames.dtype, frames.device)
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_P"]), B)  # noqa: E731
    return Launch(_content_frame_fwd_kernel, grid, (frames, logits, out, L, P, H, W, grid_bucket(B),
                                                *frames.stride(), *logits.stride()),
                  dict(FLAT=_flat(frames, logits), BLOCK_L=_block_l(L), **_meta(P))), out


def _launch_forward(frames: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    launch, out = _forward_launch(frames, logits)
    if out.numel():
        with launch_context(frames):
            launch.run()
    return out


def _backward_launch(grad: torch.Tensor, frames: torch.Tensor, logits: torch.Tensor):
    """(launch, d frames, d logits)."""
    B, L, C, H, W = frames.shape
    P = C * H * W
    d_frames = empty((B, L, C, H, W), frames.dtype, frames.device)
    d_logits = empty((B, L, C, H, W), logits.dtype, logits.device)
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_P"]), B)  # noqa: E731
    return Launch(_content_frame_bwd_kernel, grid,
                  (frames, logits, grad, d_frames, d_logits, L, P, H, W, grid_bucket(B),
                   *frames.stride(), *logits.stride(), *grad.stride()),
                  dict(FLAT=_flat(frames, logits, grad), BLOCK_L=_block_l(L), **_meta(P))), d_frames, d_logits


def _launch_backward(grad: torch.Tensor, frames: torch.Tensor, logits: torch.Tensor):
    launch, d_frames, d_logits = _backward_launch(grad, frames, logits)
    if d_frames.numel():
        with launch_context(frames):
            launch.run()
    return d_frames, d_logits


# ------------------------------------------------------------------------------ custom op + autograd

@torch.library.custom_op("cmd::content_frame", mutates_args=())
def _content_frame_op(frames: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return _launch_forward(frames, logits)


@_content_frame_op.register_fake
def _(frames, logits):
    B, L, C, H, W = frames.shape
    return frames.new_empty((B, C, H, W))


@torch.library.custom_op("cmd::content_frame_backward", mutates_args=())
def _content_frame_backward_op(
    grad: torch.Tensor, frames: torch.Tensor, logits: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_backward(grad, frames, logits)


@_content_frame_backward_op.register_fake
def _(grad, frames, logits):
    return frames.new_empty(frames.shape), logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    frames, logits = ctx.saved_tensors
    return _content_frame_backward_op(grad, frames, logits)


_content_frame_op.register_autograd(_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------- public op

def _check(frames: torch.Tensor, logits: torch.Tensor) -> None:
    if frames.dim() != 5 or frames.shape != logits.shape:
        raise ValueError(
            f"content_frame expects frames and logits of one shape (B, L, C, H, W), "
            f"got {tuple(frames.shape)} and {tuple(logits.shape)}"
        )
    if frames.shape[1] == 0:
        raise ValueError(f"content_frame needs at least one frame, got L = 0 in {tuple(frames.shape)}")
    check_same_device("content_frame", frames=frames, logits=logits)


def content_frame(frames: torch.Tensor, logits: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Content frame of a video (CMD Eq. 3): sum over L of softmax_L(logits) * frames.

    Args:
        frames: (B, L, C, H, W) video, L >= 1; any strides.
        logits: (B, L, C, H, W) importance logits, same shape and device.
        impl: ``"auto"`` (the Triton kernel for float32/float16/bfloat16 tensors on CUDA or under
            ``TRITON_INTERPRET=1``, else the reference, e.g. for float64; ``cmd_kernels.force_impl`` can pin
            it), ``"triton"`` (the kernel or an error) or ``"reference"``.

    Returns (B, C, H, W) in the frames' dtype; the softmax runs in fp32. Differentiable in frames and
    logits (a Triton backward kernel).

    Non-finite logits give what the reference (torch.softmax) gives, on every path and for any L:

    - -inf logits (masked frames, in runs of any length anywhere along L) weigh exactly 0, so those frames
      get zero gradient and so do their logits;
    - a pixel whose L logits are all -inf comes out NaN (0 / 0), as do its gradients; other pixels are
      unaffected. This is not raised as an error, since that would need a second read of the logits and
      a host sync on every call (and no check can run inside an exported graph): keep at least one finite
      logit per pixel;
    - a +inf or NaN logit makes its pixel, and that pixel's gradients, NaN.

    Frames are not checked: an inf or NaN frame carries into its pixel, even at weight 0 (0 * inf is NaN).

    Raises ValueError for inputs that are not 5-D of one shape, for L = 0, tensors on two devices, a bad
    ``impl``, or ``impl="triton"`` where the kernel cannot run; TypeError for ``impl="triton"`` with a dtype
    it does not take.
    """
    _check(frames, logits)
    if use_triton(impl, frames, logits, op="content_frame"):
        return _content_frame_op(frames, logits)
    return content_frame_reference(frames, logits)
