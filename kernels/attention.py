"""Patchified motion attention and the DiT block prologue (LayerNorm with adaLN modulation).

``motion_attention`` has the semantics of ``torch.nn.functional.scaled_dot_product_attention``
(non-causal, no mask) on (B, heads, N, head_dim) tensors, for any N and head dims up to 128.
``modulated_layernorm`` is x -> LayerNorm(x) * (1 + scale) + shift with per-sample shift/scale,
the adaLN-Zero prologue of every DiT block.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from kernels._dispatch import use_triton


def motion_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """PyTorch reference: softmax(q k^T * scale) v, scale defaulting to head_dim ** -0.5."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def motion_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, impl: str = "auto"
) -> torch.Tensor:
    """Attention over the token sequence: q, k, v (B, heads, N, head_dim) -> (B, heads, N, head_dim)."""
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"motion_attention expects q, k, v of one shape (B, heads, N, head_dim), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] > 128:
        raise ValueError(f"motion_attention supports head_dim <= 128, got {q.shape[-1]}")
    if use_triton(impl, q, k, v, op="motion_attention", available=False):
        raise AssertionError("unreachable until the Triton kernel lands")
    return motion_attention_reference(q, k, v, scale)


def modulated_layernorm_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """PyTorch reference. x (B, N, C); shift, scale (B, C). LayerNorm without affine, in fp32."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    out = normed * (1 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return out.to(x.dtype)


def modulated_layernorm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, impl: str = "auto"
) -> torch.Tensor:
    """adaLN prologue: LayerNorm(x) * (1 + scale) + shift, shift/scale per sample and channel."""
    if x.dim() != 3 or shift.shape != (x.shape[0], x.shape[2]) or scale.shape != shift.shape:
        raise ValueError(
            f"modulated_layernorm expects x (B, N, C) and shift, scale (B, C), "
            f"got {tuple(x.shape)}, {tuple(shift.shape)}, {tuple(scale.shape)}"
        )
    if use_triton(impl, x, shift, scale, op="modulated_layernorm", available=False):
        raise AssertionError("unreachable until the Triton kernel lands")
    return modulated_layernorm_reference(x, shift, scale, eps)
