"""Decoder fusion: the CMD decoder's input cube and its first LayerNorm (CMD Eqs. 5-6).

    cube[b, l, h, w, :]   = content[b, h, w, :] + time_height[b, l, h, :] + time_width[b, l, w, :]
    normed[b, l, h, w, :] = LayerNorm(cube[b, l, h, w, :]) * weight + bias

The cube is the first transformer block's residual stream; ``normed`` is that block's pre-norm
output. Position embeddings of the decoder are sums of per-axis terms, so the model folds them into
the three planes before the call: the op needs no position argument and reads only the small planes.

Forward kernel: a tile of BLOCK_T tokens x all C channels; each token gathers its three plane rows
(small, L2-resident), sums them in fp32, and writes the cube and its LayerNorm: the two cube writes are
the only large traffic, the floor for this op. Backward kernel: a (BLOCK_H x BLOCK_W x C) tile of one
sample stepping through time (a frame a step on a GPU; the whole clip at once in the interpreter,
whose cost is per operation); it recomputes the LayerNorm statistics, forms the cube gradient

    dx = g_cube + rstd * (w * g_normed - mean(w * g_normed) - xhat * mean(w * g_normed * xhat))

and reduces it in registers onto the three planes: over time for content (complete in the program),
over the tile's W for time-height and over the tile's H for time-width (per-tile partial sums that
torch adds up). No atomics: the gradients are deterministic.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cmd_kernels._dispatch import use_triton
from cmd_kernels._triton import (INTERPRETED, SUM, Launch, autotune, check_same_device, empty, grid_configs,
                             interpret_block, launch_context, next_pow2, pick)


def decoder_fusion_reference(
    content: torch.Tensor,
    time_height: torch.Tensor,
    time_width: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference. content (B, H, W, C), time_height (B, L, H, C), time_width (B, L, W, C),
    weight/bias (C,) -> cube and normed, both (B, L, H, W, C) in the content dtype (LayerNorm in fp32)."""
    cube = content[:, None, :, :, :] + time_height[:, :, :, None, :] + time_width[:, :, None, :, :]
    normed = F.layer_norm(cube.float(), cube.shape[-1:], weight.float(), bias.float(), eps)
    return cube, normed.to(cube.dtype)


def decoder_fusion_backward_reference(g_cube, g_normed, content, time_height, time_width, weight, bias, eps):
    """Closed-form gradients in fp32 -> (d content, d time_height, d time_width, d weight, d bias)."""
    x = (content.float()[:, None, :, :, :] + time_height.float()[:, :, :, None, :]
         + time_width.float()[:, :, None, :, :])
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    gn = g_normed.float()
    wdy = gn * weight.float()
    dx = g_cube.float() + rstd * (wdy - wdy.mean(-1, keepdim=True) - xhat * (wdy * xhat).mean(-1, keepdim=True))
    return (dx.sum(1).to(content.dtype), dx.sum(3).to(time_height.dtype), dx.sum(2).to(time_width.dtype),
            (gn * xhat).sum((0, 1, 2, 3)).to(weight.dtype), gn.sum((0, 1, 2, 3)).to(bias.dtype))


# -------------------------------------------------------------------------------------- forward

def _fwd_keep(kw, warps):
    # At least half a warp's rows per warp; BLOCK_T 32 on 2 warps spills registers (cmd_kernels.aot).
    return kw["BLOCK_T"] >= warps // 2 and not (kw["BLOCK_T"] == 32 and warps == 2)


def _fwd_cfg(block_t, warps, stages):
    return {"BLOCK_T": block_t}, warps, stages


_FWD_CONFIGS = grid_configs({"BLOCK_T": [2, 4, 8, 16, 32]}, num_warps=[2, 4, 8], num_stages=[1, 2], keep=_fwd_keep)
_FWD_SPACE = {"full": _FWD_CONFIGS,
              "fast": pick(_FWD_CONFIGS, _fwd_cfg(8, 4, 1), _fwd_cfg(16, 8, 1), _fwd_cfg(4, 2, 1), _fwd_cfg(8, 8, 2)),
              "off": pick(_FWD_CONFIGS, _fwd_cfg(8, 4, 1))}


@autotune(key=["T", "C"], configs=_FWD_CONFIGS, space=lambda args, mode: _FWD_SPACE[mode])
@triton.jit
def _decoder_fusion_fwd_kernel(
    CONTENT, TH, TW, WEIGHT, BIAS, CUBE, NORMED,
    T, L, H, W, C, eps,
    c_sb, c_sh, c_sw, c_sc, th_sb, th_sl, th_sh, th_sc, tw_sb, tw_sl, tw_sw, tw_sc,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # token (b, l, h, w), flat
    cols = tl.arange(0, BLOCK_C)
    t_ok = t < T
    c_ok = cols < C
    mask = t_ok[:, None] & c_ok[None, :]
    w = t % W
    h = t // W % H
    bl = t // (W * H)
    l = bl % L
    b = bl // L
    x = tl.load(CONTENT + (b * c_sb + h * c_sh + w * c_sw)[:, None] + cols[None, :] * c_sc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    x += tl.load(TH + (b * th_sb + l * th_sl + h * th_sh)[:, None] + cols[None, :] * th_sc, mask=mask,
                 other=0.0).to(tl.float32)
    x += tl.load(TW + (b * tw_sb + l * tw_sl + w * tw_sw)[:, None] + cols[None, :] * tw_sc, mask=mask,
                 other=0.0).to(tl.float32)
    out = t[:, None] * C + cols[None, :]  # both outputs dense (B, L, H, W, C)
    tl.store(CUBE + out, x.to(CUBE.dtype.element_ty), mask=mask)
    # LayerNorm of the fp32 sum (the same statistics the backward recomputes).
    mean = tl.reduce(x, 1, SUM) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.reduce(xc * xc, 1, SUM) / C + eps)
    gamma = tl.load(WEIGHT + cols, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(BIAS + cols, mask=c_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * gamma[None, :] + beta[None, :]
    tl.store(NORMED + out, y.to(NORMED.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------- backward

@triton.jit
def _decoder_fusion_bwd_kernel(
    CONTENT, TH, TW, WEIGHT, GCUBE, GNORMED,
    DCONTENT, DTH_PART, DTW_PART, DW_PART, DB_PART,
    L, H, W, C, eps,
    c_sb, c_sh, c_sw, c_sc, th_sb, th_sl, th_sh, th_sc, tw_sb, tw_sl, tw_sw, tw_sc,
    gc_sb, gc_sl, gc_sh, gc_sw, gc_sc, gn_sb, gn_sl, gn_sh, gn_sw, gn_sc,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (w tile, h tile, sample) steps through time, BLOCK_L frames a step. Tile rows are
    (frame, h) pairs: ``BLOCK_L = 1`` on a GPU (registers), the whole clip in the interpreter (whose
    cost is per operation, not per element)."""
    pid_w = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_w = tl.num_programs(0)
    n_h = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_L * BLOCK_H)
    fr = rows // BLOCK_H  # frame within the step
    hh = pid_h * BLOCK_H + rows % BLOCK_H
    ww = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    cc = tl.arange(0, BLOCK_C)
    h_ok = hh < H
    w_ok = ww < W
    c_ok = cc < C
    f3 = fr[:, None, None]
    h3 = hh[:, None, None]
    w3 = ww[None, :, None]
    c3 = cc[None, None, :]
    mask_hwc = h_ok[:, None, None] & w_ok[None, :, None] & c_ok[None, None, :]  # (R, BW, BC)

    content = tl.load(CONTENT + b * c_sb + h3 * c_sh + w3 * c_sw + c3 * c_sc, mask=mask_hwc, other=0.0)
    content = content.to(tl.float32)
    gamma = tl.load(WEIGHT + c3, mask=c_ok[None, None, :], other=0.0).to(tl.float32)
    inv_c = 1.0 / C
    # Loop-invariant pointers (time is the loop axis): the loop body is the per-frame work only.
    th_ptrs = TH + b * th_sb + f3 * th_sl + h3 * th_sh + c3 * th_sc
    tw_ptrs = TW + b * tw_sb + f3 * tw_sl + w3 * tw_sw + c3 * tw_sc
    gn_ptrs = GNORMED + b * gn_sb + f3 * gn_sl + h3 * gn_sh + w3 * gn_sw + c3 * gn_sc
    gc_ptrs = GCUBE + b * gc_sb + f3 * gc_sl + h3 * gc_sh + w3 * gc_sw + c3 * gc_sc
    # Partial-sum slots of this program: time-height over this W tile, time-width over this H tile.
    dth_ptrs = DTH_PART + ((b * n_w + pid_w) * L * H) * C + (fr * H + hh)[:, None] * C + cc[None, :]
    if BLOCK_L == 1:
        dtw_ptrs = DTW_PART + ((b * n_h + pid_h) * L * W) * C + ww[:, None] * C + cc[None, :]
    else:
        f_tw = tl.arange(0, BLOCK_L)
        dtw_ptrs = (DTW_PART + ((b * n_h + pid_h) * L * W) * C + f_tw[:, None, None] * W * C
                    + ww[None, :, None] * C + cc[None, None, :])
    d_content = tl.full([BLOCK_H, BLOCK_W, BLOCK_C], 0.0, tl.float32)
    # d weight, d bias: summed over tile rows each step (fewer live registers), over W after the loop.
    d_gamma = tl.full([BLOCK_W, BLOCK_C], 0.0, tl.float32)
    d_beta = tl.full([BLOCK_W, BLOCK_C], 0.0, tl.float32)
    for l0 in range(0, L, BLOCK_L):
        l_ok = (l0 + fr) < L
        mask = mask_hwc & l_ok[:, None, None]
        x = content + tl.load(th_ptrs + l0 * th_sl, mask=mask, other=0.0).to(tl.float32)
        x += tl.load(tw_ptrs + l0 * tw_sl, mask=mask, other=0.0).to(tl.float32)
        mean = tl.reduce(x, 2, SUM)[:, :, None] * inv_c
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.math.rsqrt(tl.reduce(xc * xc, 2, SUM)[:, :, None] * inv_c + eps)
        xhat = xc * rstd
        gn = tl.load(gn_ptrs + l0 * gn_sl, mask=mask, other=0.0).to(tl.float32)
        gc = tl.load(gc_ptrs + l0 * gc_sl, mask=mask, other=0.0).to(tl.float32)
        wdy = gn * gamma
        c1 = tl.reduce(wdy, 2, SUM)[:, :, None] * inv_c
        c2 = tl.reduce(wdy * xhat, 2, SUM)[:, :, None] * inv_c
        # Padded channels hold garbage here, but they are never stored nor summed across channels;
        # padded rows and frames hold zeros (all their inputs were masked to zero).
        dx = gc + rstd * (wdy - c1 - xhat * c2)
        d_gamma += tl.reduce(gn * xhat, 0, SUM)
        d_beta += tl.reduce(gn, 0, SUM)
        tl.store(dth_ptrs + l0 * H * C, tl.reduce(dx, 1, SUM), mask=(l_ok & h_ok)[:, None] & c_ok[None, :])
        if BLOCK_L == 1:
            d_content += dx
            tl.store(dtw_ptrs + l0 * W * C, tl.reduce(dx, 0, SUM), mask=w_ok[:, None] & c_ok[None, :])
        else:  # rows are (frame, h): split them to sum over frames (content) and over h (time-width)
            dx4 = tl.reshape(dx, [BLOCK_L, BLOCK_H, BLOCK_W, BLOCK_C])
            d_content += tl.reduce(dx4, 0, SUM)
            f_ok = (l0 + f_tw) < L
            tl.store(dtw_ptrs + l0 * W * C, tl.reduce(dx4, 1, SUM),
                     mask=f_ok[:, None, None] & w_ok[None, :, None] & c_ok[None, None, :])

    h_out = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_out3 = h_out[:, None, None]
    tl.store(DCONTENT + ((b * H + h_out3) * W + w3) * C + c3, d_content.to(DCONTENT.dtype.element_ty),
             mask=(h_out3 < H) & w_ok[None, :, None] & c_ok[None, None, :])
    slot = ((b * n_h + pid_h) * n_w + pid_w) * C + cc
    tl.store(DW_PART + slot, tl.reduce(d_gamma, 0, SUM), mask=c_ok)
    tl.store(DB_PART + slot, tl.reduce(d_beta, 0, SUM), mask=c_ok)


# ------------------------------------------------------------------------------------- launchers

def _forward_launch(content, time_height, time_width, weight, bias, eps):
    """(launch, cube, normed)."""
    B, H, W, C = content.shape
    L = time_height.shape[1]
    dtype = torch.promote_types(torch.promote_types(content.dtype, time_height.dtype), time_width.dtype)
    cube = empty((B, L, H, W, C), dtype, content.device)
    normed = empty(cube.shape, cube.dtype, cube.device)
    T = B * L * H * W
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)  # noqa: E731
    # Interpreter: up to 256K values per program (a small model's cube in one or two programs).
    meta = {"BLOCK_T": interpret_block(T, max(1, 262144 // next_pow2(C)))} if INTERPRETED else {}
    return Launch(_decoder_fusion_fwd_kernel, grid,
                  (content, time_height, time_width, weight, bias, cube, normed, T, L, H, W, C, eps,
                   *content.stride(), *time_height.stride(), *time_width.stride()),
                  dict(BLOCK_C=next_pow2(C), **meta)), cube, normed


def _launch_forward(content, time_height, time_width, weight, bias, eps):
    launch, cube, normed = _forward_launch(content, time_height, time_width, weight, bias, eps)
    if cube.numel():
        with launch_context(content):
            launch.run()
    return cube, normed


def _bwd_tiles(L: int, H: int, W: int, C: int, interpreted: bool = INTERPRETED) -> Tuple[int, int, int, int, int]:
    """(BLOCK_L, BLOCK_H, BLOCK_W, BLOCK_C, num_warps) of the backward. GPU: one frame a step and about
    8K fp32 values per (H x W x C) tile (registers cap it; partial sums shrink as it grows).
    Interpreter: up to 256K values a step, the whole clip first (few, large numpy operations)."""
    block_c = next_pow2(C)
    if interpreted:
        budget = max(1, (1 << 18) // block_c)
        block_l = min(next_pow2(L), budget)
        budget = max(1, budget // block_l)
    else:
        block_l, budget = 1, max(1, 8192 // block_c)
    block_w = min(next_pow2(W), max(1, next_pow2(int(budget ** 0.5))))
    block_h = min(next_pow2(H), max(1, budget // block_w))
    return block_l, block_h, block_w, block_c, 8 if block_h * block_w * block_c >= 8192 else 4


def _backward_launch(g_cube, g_normed, content, time_height, time_width, weight, bias, eps):
    """(launch, [d content, time-height / time-width / weight / bias partial sums])."""
    B, H, W, C = content.shape
    L = time_height.shape[1]
    dev = content.device
    block_l, block_h, block_w, block_c, warps = _bwd_tiles(L, H, W, C)
    n_h, n_w = triton.cdiv(H, block_h), triton.cdiv(W, block_w)
    d_content = empty((B, H, W, C), content.dtype, dev)
    dth_part = empty((B, n_w, L, H, C), torch.float32, dev)
    dtw_part = empty((B, n_h, L, W, C), torch.float32, dev)
    dw_part = empty((B * n_h * n_w, C), torch.float32, dev)
    db_part = empty((B * n_h * n_w, C), torch.float32, dev)
    outs = [d_content, dth_part, dtw_part, dw_part, db_part]
    return Launch(_decoder_fusion_bwd_kernel, (n_w, n_h, B),
                  (content, time_height, time_width, weight, g_cube, g_normed, *outs, L, H, W, C, eps,
                   *content.stride(), *time_height.stride(), *time_width.stride(), *g_cube.stride(),
                   *g_normed.stride()),
                  dict(BLOCK_L=block_l, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps)), outs


def _launch_backward(g_cube, g_normed, content, time_height, time_width, weight, bias, eps):
    launch, (d_content, dth_part, dtw_part, dw_part, db_part) = _backward_launch(
        g_cube, g_normed, content, time_height, time_width, weight, bias, eps)
    if g_cube.numel() == 0:
        for t in (d_content, dth_part, dtw_part, dw_part, db_part):
            t.zero_()
    else:
        with launch_context(content):
            launch.run()
    return (d_content, dth_part.sum(1).to(time_height.dtype), dtw_part.sum(1).to(time_width.dtype),
            dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(bias.dtype))


# ------------------------------------------------------------------------------ custom op + autograd

@torch.library.custom_op("cmd::decoder_fusion", mutates_args=())
def _decoder_fusion_op(
    content: torch.Tensor, time_height: torch.Tensor, time_width: torch.Tensor,
    weight: torch.Tensor, bias: torch.Tensor, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(content, time_height, time_width, weight, bias, eps)


@_decoder_fusion_op.register_fake
def _(content, time_height, time_width, weight, bias, eps):
    B, H, W, C = content.shape
    L = time_height.shape[1]
    dtype = torch.promote_types(torch.promote_types(content.dtype, time_height.dtype), time_width.dtype)
    cube = content.new_empty((B, L, H, W, C), dtype=dtype)
    return cube, torch.empty_like(cube)


@torch.library.custom_op("cmd::decoder_fusion_backward", mutates_args=())
def _decoder_fusion_backward_op(
    g_cube: torch.Tensor, g_normed: torch.Tensor, content: torch.Tensor, time_height: torch.Tensor,
    time_width: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(g_cube, g_normed, content, time_height, time_width, weight, bias, eps)


@_decoder_fusion_backward_op.register_fake
def _(g_cube, g_normed, content, time_height, time_width, weight, bias, eps):
    return tuple(t.new_empty(t.shape) for t in (content, time_height, time_width, weight, bias))


def _setup_context(ctx, inputs, output):
    content, time_height, time_width, weight, bias, eps = inputs
    ctx.save_for_backward(content, time_height, time_width, weight, bias)
    ctx.eps = eps


def _backward(ctx, g_cube, g_normed):
    grads = _decoder_fusion_backward_op(g_cube, g_normed, *ctx.saved_tensors, ctx.eps)
    return (*grads, None)


_decoder_fusion_op.register_autograd(_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------- public op

def _check(content, time_height, time_width, weight, bias) -> None:
    if content.dim() != 4 or time_height.dim() != 4 or time_width.dim() != 4:
        raise ValueError(
            "decoder_fusion expects content (B, H, W, C), time_height (B, L, H, C), time_width (B, L, W, C), "
            f"got {tuple(content.shape)}, {tuple(time_height.shape)}, {tuple(time_width.shape)}"
        )
    b, h, w, c = content.shape
    if time_height.shape[0] != b or time_height.shape[2:] != (h, c):
        raise ValueError(f"time_height {tuple(time_height.shape)} does not match content {tuple(content.shape)}")
    if time_width.shape != (b, time_height.shape[1], w, c):
        raise ValueError(f"time_width {tuple(time_width.shape)} does not match (B, L, W, C) = "
                         f"{(b, time_height.shape[1], w, c)}")
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"LayerNorm weight/bias must be ({c},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    check_same_device("decoder_fusion", content=content, time_height=time_height, time_width=time_width,
                      weight=weight, bias=bias)


def decoder_fusion(
    content: torch.Tensor,
    time_height: torch.Tensor,
    time_width: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The CMD decoder's input cube and its first LayerNorm in one pass (CMD Eqs. 5-6):
    cube = content + time_height + time_width (broadcast over L, H, W), normed = LayerNorm(cube).

    Args:
        content: (B, H, W, C) plane; time_height: (B, L, H, C); time_width: (B, L, W, C). Any strides.
        weight, bias: (C,) LayerNorm parameters (may stay float32 under autocast).
        eps: LayerNorm epsilon, positive.
        impl: ``"auto"`` (the Triton kernel for float32/float16/bfloat16 tensors on CUDA or under
            ``TRITON_INTERPRET=1``, else the reference; ``cmd_kernels.force_impl`` can pin it), ``"triton"``
            (the kernel or an error) or ``"reference"``.

    Returns (cube, normed), both (B, L, H, W, C) in the planes' promoted dtype; the LayerNorm runs in
    fp32. Differentiable in every input (a Triton backward kernel, deterministic).

    Raises ValueError for planes whose shapes do not match as above, weight or bias not (C,), eps <= 0,
    tensors on two devices, a bad ``impl``, or ``impl="triton"`` where the kernel cannot run; TypeError for
    ``impl="triton"`` with a dtype it does not take.
    """
    _check(content, time_height, time_width, weight, bias)
    if not eps > 0:
        raise ValueError(f"decoder_fusion eps must be positive, got {eps}")
    if use_triton(impl, content, time_height, time_width, weight, bias, op="decoder_fusion"):
        return _decoder_fusion_op(content, time_height, time_width, weight, bias, float(eps))
    return decoder_fusion_reference(content, time_height, time_width, weight, bias, eps)
