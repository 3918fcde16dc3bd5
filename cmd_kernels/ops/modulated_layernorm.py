"""Modulated LayerNorm: the DiT block prologue, LayerNorm with adaLN modulation (DiT, Peebles & Xie 2023,
section 3.2, adaLN-Zero).

    y[b, n, :] = LayerNorm(x[b, n, :]) * (1 + scale[b, :]) + shift[b, :]

LayerNorm without affine parameters, in fp32 whatever the input dtype; the result has x's dtype.

Forward kernel: a tile of rows, each a LayerNorm in fp32 with the per-sample modulation applied in the
same pass. Backward kernel: writes dx and per-program partial sums of d shift / d scale (reduced by
torch, so the result is deterministic: no atomics).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cmd_kernels._dispatch import use_triton
from cmd_kernels._triton import INTERPRETED, SUM, Launch, check_same_device, empty, launch_context, next_pow2


# -------------------------------------------------------------------------------------- reference

def modulated_layernorm_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """PyTorch reference. x (B, N, C); shift, scale (B, C). LayerNorm without affine, in fp32."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    out = normed * (1 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------- kernels

def _rows_config(C: int, interpreted: bool = INTERPRETED) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_R, num_warps) for a row kernel over C channels: about 4K fp32 values per tile
    on a GPU (16 per thread at 8 warps), large tiles (few programs) in the interpreter."""
    block_c = next_pow2(C)
    if interpreted:
        return block_c, max(1, min(256, 32768 // block_c)), 4
    block_r = max(1, min(16, 4096 // block_c))
    return block_c, block_r, 8 if block_c * block_r >= 4096 else 4


@triton.jit
def _modln_fwd_kernel(
    X, SHIFT, SCALE, Y, R, N, C, eps,
    x_sb, x_sn, x_sc, sh_sb, sh_sc, sc_sb, sc_sc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    r_ok = rows < R
    c_ok = cols < C
    mask = r_ok[:, None] & c_ok[None, :]
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    x = tl.load(X + (b * x_sb + n * x_sn)[:, None] + cols[None, :] * x_sc, mask=mask, other=0.0).to(tl.float32)
    mean = tl.reduce(x, 1, SUM) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.reduce(xc * xc, 1, SUM) / C + eps)
    shift = tl.load(SHIFT + (b * sh_sb)[:, None] + cols[None, :] * sh_sc, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + (b * sc_sb)[:, None] + cols[None, :] * sc_sc, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + scale) + shift
    tl.store(Y + rows.to(tl.int64)[:, None] * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _modln_bwd_kernel(
    X, SCALE, G, DX, DSHIFT_PART, DSCALE_PART, N, C, ROWS_PER_PROG, eps,
    x_sb, x_sn, x_sc, sc_sb, sc_sc, g_sb, g_sn, g_sc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (chunk, b) handles rows [chunk * ROWS_PER_PROG, ...) of sample b: writes their dx and
    its partial sums of d shift = sum_n g and d scale = sum_n g * xhat to slot (b, chunk)."""
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    scale = tl.load(SCALE + b * sc_sb + cols * sc_sc, mask=c_ok, other=0.0).to(tl.float32)
    d_shift = tl.full([BLOCK_C], 0.0, tl.float32)
    d_scale = tl.full([BLOCK_C], 0.0, tl.float32)
    row_end = tl.minimum((chunk + 1) * ROWS_PER_PROG, N)
    for r0 in range(chunk * ROWS_PER_PROG, row_end, BLOCK_R):
        n = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (n < row_end)[:, None] & c_ok[None, :]
        x = tl.load(X + b * x_sb + n[:, None] * x_sn + cols[None, :] * x_sc, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + b * g_sb + n[:, None] * g_sn + cols[None, :] * g_sc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.reduce(x, 1, SUM) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.reduce(xc * xc, 1, SUM) / C + eps)
        xhat = xc * rstd[:, None]
        dxhat = g * (1.0 + scale)[None, :]
        c1 = tl.reduce(dxhat, 1, SUM) / C
        c2 = tl.reduce(dxhat * xhat, 1, SUM) / C
        dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
        tl.store(DX + (b * N + n)[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        d_shift += tl.reduce(g, 0, SUM)
        d_scale += tl.reduce(g * xhat, 0, SUM)
    part = (b * tl.num_programs(0) + chunk) * C + cols
    tl.store(DSHIFT_PART + part, d_shift, mask=c_ok)
    tl.store(DSCALE_PART + part, d_scale, mask=c_ok)


def _forward_launch(x, shift, scale, eps) -> Tuple[Launch, torch.Tensor]:
    B, N, C = x.shape
    y = empty((B, N, C), x.dtype, x.device)
    block_c, block_r, warps = _rows_config(C)
    return Launch(_modln_fwd_kernel, (triton.cdiv(B * N, block_r),),
                  (x, shift, scale, y, B * N, N, C, eps, *x.stride(), *shift.stride(), *scale.stride()),
                  dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)), y


def _launch_forward(x, shift, scale, eps):
    launch, y = _forward_launch(x, shift, scale, eps)
    if y.numel():
        with launch_context(x):
            launch.run()
    return y


def _bwd_chunks(B: int, N: int, block_r: int, device: torch.device, num_sms: Optional[int] = None) -> int:
    """Programs per sample in the backward: enough to fill the GPU's ``num_sms`` (default: the device's;
    each program reduces a run of rows in registers and writes one partial d shift / d scale row); one
    in the interpreter and off CUDA (unless ``num_sms`` is given: ``cmd_kernels.aot`` compiles for a target)."""
    if INTERPRETED or (device.type != "cuda" and num_sms is None):
        return 1
    sms = num_sms or torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(N, block_r), triton.cdiv(4 * sms, max(B, 1))))


def _backward_launch(grad, x, shift, scale, eps, num_sms: Optional[int] = None):
    """(launch, dx, partial d shift / d scale sums (2, B, chunks, C) fp32)."""
    B, N, C = x.shape
    dx = empty((B, N, C), x.dtype, x.device)
    block_c, block_r, warps = _rows_config(C)
    chunks = _bwd_chunks(B, N, block_r, x.device, num_sms)
    rows_per_prog = triton.cdiv(triton.cdiv(N, chunks), block_r) * block_r
    chunks = triton.cdiv(N, rows_per_prog) if N else 1
    parts = empty((2, B, chunks, C), torch.float32, x.device)
    return Launch(_modln_bwd_kernel, (chunks, B),
                  (x, scale, grad, dx, parts[0], parts[1], N, C, rows_per_prog, eps,
                   *x.stride(), *scale.stride(), *grad.stride()),
                  dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)), dx, parts


def _launch_backward(grad, x, shift, scale, eps):
    launch, dx, parts = _backward_launch(grad, x, shift, scale, eps)
    if dx.numel():
        with launch_context(x):
            launch.run()
    else:  # no rows (N = 0): d shift and d scale are sums over nothing
        parts.zero_()
    # Two separate reductions: outputs of a custom op must not alias one another.
    return dx, parts[0].sum(1).to(shift.dtype), parts[1].sum(1).to(scale.dtype)


@torch.library.custom_op("cmd::modulated_layernorm", mutates_args=())
def _modulated_layernorm_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch_forward(x, shift, scale, eps)


@_modulated_layernorm_op.register_fake
def _(x, shift, scale, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("cmd::modulated_layernorm_backward", mutates_args=())
def _modulated_layernorm_backward_op(
    grad: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad, x, shift, scale, eps)


@_modulated_layernorm_backward_op.register_fake
def _(grad, x, shift, scale, eps):
    return x.new_empty(x.shape), shift.new_empty(shift.shape), scale.new_empty(scale.shape)


def _setup_context(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.eps = eps


def _backward(ctx, grad):
    x, shift, scale = ctx.saved_tensors
    dx, dshift, dscale = _modulated_layernorm_backward_op(grad, x, shift, scale, ctx.eps)
    return dx, dshift, dscale, None


_modulated_layernorm_op.register_autograd(_backward, setup_context=_setup_context)


def modulated_layernorm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, impl: str = "auto"
) -> torch.Tensor:
    """The DiT block prologue (adaLN): LayerNorm(x) * (1 + scale) + shift, per sample and channel.

    Args:
        x: (B, N, C) tokens; any strides.
        shift, scale: (B, C) each (the DiT passes column slices of its (B, 6C) adaLN modulation).
        eps: LayerNorm epsilon, positive.
        impl: ``"auto"`` (the Triton kernel for float32/float16/bfloat16 tensors on CUDA or under
            ``TRITON_INTERPRET=1``, else the reference; ``cmd_kernels.force_impl`` can pin it), ``"triton"``
            (the kernel or an error) or ``"reference"``.

    Returns (B, N, C) in x's dtype; the normalisation and modulation run in fp32. Differentiable in x,
    shift and scale (a Triton backward kernel, deterministic).

    Raises ValueError for shapes other than x (B, N, C) with shift, scale (B, C), eps <= 0, tensors on two
    devices, a bad ``impl``, or ``impl="triton"`` where the kernel cannot run; TypeError for
    ``impl="triton"`` with a dtype it does not take.
    """
    if x.dim() != 3 or shift.shape != (x.shape[0], x.shape[2]) or scale.shape != shift.shape:
        raise ValueError(
            f"modulated_layernorm expects x (B, N, C) and shift, scale (B, C), "
            f"got {tuple(x.shape)}, {tuple(shift.shape)}, {tuple(scale.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"modulated_layernorm eps must be positive, got {eps}")
    check_same_device("modulated_layernorm", x=x, shift=shift, scale=scale)
    if use_triton(impl, x, shift, scale, op="modulated_layernorm"):
        return _modulated_layernorm_op(x, shift, scale, float(eps))
    return modulated_layernorm_reference(x, shift, scale, eps)
