"""Patchified motion attention: the full self-attention of the motion DiT over [z tokens ; content-frame
tokens] (CMD section 3.2).

``motion_attention`` has the semantics of ``torch.nn.functional.scaled_dot_product_attention``
(non-causal, no mask) on (B, heads, N, head_dim) tensors, for any N and head dims up to 128.

Kernel: FlashAttention-2 forward (one program per BLOCK_M queries of one head, online softmax
over BLOCK_N keys in base 2 with log2(e) folded into the scale, fp32 accumulators, no atomics). Head
dims that are not a power of two are split into a power-of-two main part and a small tail (72 = 64 + 8
in a 16-wide tile, 80 = 64 + 16, 96 = 64 + 32) instead of padding to 128: 1.6x fewer MMA FLOPs at 72.
The output is written token-major, (B, N, heads, d) memory seen as (B, heads, N, d), so the DiT's
``out.transpose(1, 2).reshape(B, N, C)`` that follows is free, as after SDPA's flash backend.
Gradients re-run SDPA's fused backward (the forward is ours; training may use SDPA for gradients).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cmd_kernels._dispatch import use_triton
from cmd_kernels._triton import (GRID_BUCKET, INTERPRETED, LOG2E, MAX, SUM, Launch, Target, autotune,
                             check_same_device, empty, grid_bucket, grid_configs, interpret_block, launch_context,
                             next_pow2, pick)

MAX_HEAD_DIM = 128


# -------------------------------------------------------------------------------------- reference

def motion_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """PyTorch reference: softmax(q k^T * scale) v, scale defaulting to head_dim ** -0.5."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ---------------------------------------------------------------------------------------- kernel

def _attn_keep(kw, warps):
    return (kw["BLOCK_M"] == 128) == (warps == 8)  # 4 warps per 64 query rows


def _attn_cfg(m, n, stages):
    return {"BLOCK_M": m, "BLOCK_N": n}, 8 if m == 128 else 4, stages


# fp16/bf16: tensor-core tiles, K/V pipelined through shared memory (cp.async, num_stages buffers).
_ATTN_CONFIGS = grid_configs({"BLOCK_M": [64, 128], "BLOCK_N": [32, 64, 128]}, num_warps=[4, 8],
                             num_stages=[2, 3, 4], keep=_attn_keep)
_ATTN_FAST = pick(_ATTN_CONFIGS, _attn_cfg(128, 64, 3), _attn_cfg(128, 128, 2), _attn_cfg(64, 64, 3),
                  _attn_cfg(128, 32, 3))
# CMD_AUTOTUNE=off: the first of these that fits the target.
_ATTN_OFF = pick(_ATTN_CONFIGS, _attn_cfg(128, 64, 3), _attn_cfg(64, 64, 2), _attn_cfg(64, 32, 2))
# fp32 (IEEE dots on FMA units): only tiles that spill no register at head dims 64, 72 and 128 on sm_80
# and sm_90 with Triton 3.6 and 3.9 (measured with cmd_kernels.aot; the tiles of the fp16/bf16 space with 4
# warps per 64 rows all spill at d72; tests/cmd_kernels/test_aot.py holds it at the configs' shapes).
_ATTN_FP32 = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=2)
              for m, n, w in ((64, 32, 8), (64, 16, 4), (32, 32, 4))]
_ATTN_SPACE = {"full": _ATTN_CONFIGS, "fast": _ATTN_FAST, "off": _ATTN_OFF}
_ATTN_FP32_SPACE = {"full": _ATTN_FP32, "fast": _ATTN_FP32[:2], "off": _ATTN_FP32}


def _attn_space(args, mode):
    return (_ATTN_FP32_SPACE if args["IS_FP32"] else _ATTN_SPACE)[mode]


def _attn_smem(config, args, arch: int) -> int:
    """Shared memory (bytes) Triton allocates for a config: the cp.async pipeline's K and V tiles
    (BLOCK_N x padded head dim; ``num_stages`` buffers for sm_90's wgmma, one fewer for mma.sync and the
    fp32 FMA dots), the Q tile, and for fp32 the P tile plus a little scratch. Fitted to the compiles of
    ``python -m cmd_kernels.aot --unpruned`` (Triton 3.6 and 3.9, head dims 32-128): exact for fp16/bf16,
    for fp32 at most 512 B above the allocation (tests/cmd_kernels/test_aot.py checks both)."""
    fp32 = args["IS_FP32"]
    el = 4 if fp32 else 2
    d = args["D1"] + (args["D2"] if args["TAIL"] else 0)
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    buffers = config.num_stages if arch >= 90 and not fp32 else max(1, config.num_stages - 1)
    return el * (2 * buffers * n * d + m * d + (m * n if fp32 else 0)) + (512 if fp32 else 0)


def _attn_fits(config, args, target: Target) -> bool:
    return _attn_smem(config, args, target.arch) <= target.max_shared_mem


def _attn_align(a) -> int:
    """Elements per 16 bytes when every batch, head and token stride of q, k, v and out is a multiple of
    it (every row then starts 16-byte aligned), else 1. Triton only proves alignment of integers that
    are multiples of 16, so at head dims 72 and 80 (strides 72 x heads ...) it would fall back to
    scalar loads without this hint."""
    vec = 16 // a["Q"].dtype.itemsize
    strides = [a[f"{t}_s{axis}"] for t in "qkvo" for axis in "bhn"]
    return vec if all(s % vec == 0 for s in strides) else 1


@autotune(key=["N", "HEAD_DIM", "IS_FP32", GRID_BUCKET], configs=_ATTN_CONFIGS + _ATTN_FP32, space=_attn_space, fits=_attn_fits)
# EVEN_M / EVEN_N: loads and stores of that axis need no mask (N a multiple of the block, and no head
# dims padded in the main part: head_dim < 16 pads D1 to 16). ALIGN: see _attn_align.
@triton.heuristics({"EVEN_M": lambda a: a["N"] % a["BLOCK_M"] == 0 and a["D1"] <= a["HEAD_DIM"],
                    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["D1"] <= a["HEAD_DIM"],
                    "ALIGN": _attn_align})
@triton.jit(do_not_specialize=[GRID_BUCKET])
def _attention_fwd_kernel(
    Q, K, V, O, qk_scale, N, HEADS, GRID_BUCKET,
    q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn,
    HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, TAIL: tl.constexpr,
    UPCAST: tl.constexpr, IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    ALIGN: tl.constexpr,
):
    if ALIGN > 1:  # a value-preserving rewrite that lets the compiler prove 16-byte row alignment
        q_sb, q_sh, q_sn = q_sb // ALIGN * ALIGN, q_sh // ALIGN * ALIGN, q_sn // ALIGN * ALIGN
        k_sb, k_sh, k_sn = k_sb // ALIGN * ALIGN, k_sh // ALIGN * ALIGN, k_sn // ALIGN * ALIGN
        v_sb, v_sh, v_sn = v_sb // ALIGN * ALIGN, v_sh // ALIGN * ALIGN, v_sn // ALIGN * ALIGN
        o_sb, o_sh, o_sn = o_sb // ALIGN * ALIGN, o_sh // ALIGN * ALIGN, o_sn // ALIGN * ALIGN
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HEADS).to(tl.int64)
    h = (bh % HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d1 = tl.arange(0, D1)
    d1_ok = d1 < HEAD_DIM
    m_ok = offs_m < N
    q_ptrs = Q + b * q_sb + h * q_sh + offs_m[:, None] * q_sn
    k_base = K + b * k_sb + h * k_sh
    v_base = V + b * v_sb + h * v_sh

    # Queries stay in registers for the whole loop.
    if EVEN_M:
        q1 = tl.load(q_ptrs + d1[None, :])
    else:
        q1 = tl.load(q_ptrs + d1[None, :], mask=m_ok[:, None] & d1_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 arithmetic is wrong: fp32 from the load on
        q1 = q1.to(tl.float32)
    if TAIL:
        d2 = D1 + tl.arange(0, D2)
        d2_ok = d2 < HEAD_DIM
        q2 = tl.load(q_ptrs + d2[None, :], mask=m_ok[:, None] & d2_ok[None, :], other=0.0)
        if UPCAST:
            q2 = q2.to(tl.float32)
        acc2 = tl.full([BLOCK_M, D2], 0.0, tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc1 = tl.full([BLOCK_M, D1], 0.0, tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < N
        # K^T tile (D, BLOCK_N) and V tile (BLOCK_N, D).
        kt_ptrs = k_base + cols[None, :] * k_sn
        v_ptrs = v_base + cols[:, None] * v_sn
        if EVEN_N:
            kt1 = tl.load(kt_ptrs + d1[:, None])
        else:
            kt1 = tl.load(kt_ptrs + d1[:, None], mask=n_ok[None, :] & d1_ok[:, None], other=0.0)
        if UPCAST:
            kt1 = kt1.to(tl.float32)
        if IS_FP32:
            s = tl.dot(q1, kt1, input_precision="ieee")
        else:
            s = tl.dot(q1, kt1)
        if TAIL:
            kt2 = tl.load(kt_ptrs + d2[:, None], mask=n_ok[None, :] & d2_ok[:, None], other=0.0)
            if UPCAST:
                kt2 = kt2.to(tl.float32)
            if IS_FP32:
                s += tl.dot(q2, kt2, input_precision="ieee")
            else:
                s += tl.dot(q2, kt2)
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX))
        # Safe max (as FlashAttention): a row whose scores so far are all -inf (a key block of -inf
        # scores, from infinite inputs) has m_new = -inf, and exp2(-inf - -inf) would be NaN. Subtracting
        # 0 there gives alpha = p = 0, and the row carries on exactly once a finite score comes. One
        # select per row per key block.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, SUM)
        m_i = m_new

        if EVEN_N:
            v1 = tl.load(v_ptrs + d1[None, :])
        else:
            v1 = tl.load(v_ptrs + d1[None, :], mask=n_ok[:, None] & d1_ok[None, :], other=0.0)
        if UPCAST:
            v1 = v1.to(tl.float32)
        if IS_FP32:
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision="ieee")
        else:
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1)
        if TAIL:
            v2 = tl.load(v_ptrs + d2[None, :], mask=n_ok[:, None] & d2_ok[None, :], other=0.0)
            if UPCAST:
                v2 = v2.to(tl.float32)
            if IS_FP32:
                acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision="ieee")
            else:
                acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2)

    # l_i is 0 only where every score of the row is -inf: SDPA returns 0 there (its safe softmax), and
    # acc is 0 (0 * v), so divide by 1 (FlashAttention's rule; a NaN acc stays NaN, as in SDPA).
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    o_ptrs = O + b * o_sb + h * o_sh + offs_m[:, None] * o_sn
    out1 = (acc1 * inv_l[:, None]).to(O.dtype.element_ty)
    if EVEN_M:
        tl.store(o_ptrs + d1[None, :], out1)
    else:
        tl.store(o_ptrs + d1[None, :], out1, mask=m_ok[:, None] & d1_ok[None, :])
    if TAIL:
        out2 = (acc2 * inv_l[:, None]).to(O.dtype.element_ty)
        tl.store(o_ptrs + d2[None, :], out2, mask=m_ok[:, None] & d2_ok[None, :])


def _head_split(d: int) -> Tuple[int, int, bool]:
    """Head dim -> (main power-of-two part D1, tail tile D2, has tail). tl.dot needs dims >= 16."""
    if d <= 16:
        return 16, 16, False
    d1 = 1 << (d.bit_length() - 1)  # largest power of two <= d
    if d1 == d:
        return d1, 16, False
    return d1, max(16, next_pow2(d - d1)), True


def _forward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Tuple[Launch, torch.Tensor]:
    """The forward launch for q, k, v (B, heads, N, d) with unit last stride, and its output."""
    B, H, N, D = q.shape
    # Token-major output, as SDPA's flash backend returns it: the following transpose(1, 2) is free.
    out = empty((B, N, H, D), q.dtype, q.device).transpose(1, 2)
    d1, d2, tail = _head_split(D)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    # Interpreter: a DiT-tiny sequence (up to 256 tokens) in one program per head.
    meta = {"BLOCK_M": interpret_block(N, 256, 16), "BLOCK_N": interpret_block(N, 256, 16)} if INTERPRETED else {}
    args = (q, k, v, out, scale * LOG2E, N, H, grid_bucket(B * H),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))
    return Launch(_attention_fwd_kernel, grid, args, dict(
        HEAD_DIM=D, D1=d1, D2=d2, TAIL=tail, UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        IS_FP32=q.dtype == torch.float32, **meta)), out


def _launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    launch, out = _forward_launch(q, k, v, scale)
    if out.numel():
        with launch_context(q):
            launch.run()
    return out


@torch.library.custom_op("cmd::motion_attention", mutates_args=())
def _motion_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _launch_forward(q, k, v, scale)


@_motion_attention_op.register_fake
def _(q, k, v, scale):
    B, H, N, D = q.shape
    return q.new_empty((B, N, H, D)).transpose(1, 2)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad):
    # Re-run SDPA (flash / memory-efficient on CUDA) and take its fused backward: no N x N buffer.
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q_, k_, v_, scale=ctx.scale)
        dq, dk, dv = torch.autograd.grad(out, (q_, k_, v_), grad)
    return dq, dk, dv, None


_motion_attention_op.register_autograd(_backward, setup_context=_setup_context)


def motion_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, impl: str = "auto"
) -> torch.Tensor:
    """Attention over the token sequence, as ``torch.nn.functional.scaled_dot_product_attention`` (non-causal,
    no mask; the reference): softmax(q k^T * scale) v.

    Args:
        q, k, v: (B, heads, N, head_dim) each, one dtype, one device; any strides (the DiT passes views of
            its (B, N, 3, heads, head_dim) projection). head_dim <= 128.
        scale: positive score scale; None for head_dim ** -0.5.
        impl: ``"auto"`` (the Triton kernel for float32/float16/bfloat16 tensors on CUDA or under
            ``TRITON_INTERPRET=1``, else the reference; ``cmd_kernels.force_impl`` can pin it), ``"triton"``
            (the kernel or an error) or ``"reference"``.

    Returns (B, heads, N, head_dim) in q's dtype; from the kernel, token-major memory (a view of
    (B, N, heads, head_dim)), so ``out.transpose(1, 2).reshape(B, N, heads * head_dim)`` is free.
    Differentiable in q, k, v (gradients from SDPA's fused backward).

    Finite inputs give finite scores. Infinite inputs follow SDPA on every path: keys whose score is -inf
    weigh 0 (runs of any length, anywhere along N); a row whose scores are all -inf gives 0 (SDPA's safe
    softmax, not NaN); a +inf or NaN score makes its row NaN.

    Raises ValueError for q, k, v that are not 4-D of one shape, head_dim > 128, a scale that is not
    positive, tensors on two devices, a bad ``impl``, or ``impl="triton"`` where the kernel cannot run;
    TypeError for mixed dtypes, or ``impl="triton"`` with another dtype (e.g. float64).
    """
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"motion_attention expects q, k, v of one shape (B, heads, N, head_dim), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"motion_attention supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"motion_attention expects one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device("motion_attention", q=q, k=k, v=v)
    if scale is not None and not (scale > 0):
        raise ValueError(f"motion_attention scale must be positive, got {scale}")
    if use_triton(impl, q, k, v, op="motion_attention"):
        return _motion_attention_op(q, k, v, float(scale if scale is not None else q.shape[-1] ** -0.5))
    return motion_attention_reference(q, k, v, scale)
