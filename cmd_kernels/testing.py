"""What the kernel tests (``tests/cmd_kernels``) and the kernel benchmark (``cmd_kernels.bench``) share: the error
measure, the per-dtype tolerances (DESIGN section 7), fp64 references without a fused op, and input makers
that lay tensors out as the engine's networks do.

Tolerances: the relative Frobenius error against an fp64 reference of the same inputs is at most
``TOL[dtype]``; in bf16 also at most twice PyTorch's own error in bf16 (``within_tolerance``).
"""

from typing import List, Optional, Sequence, Tuple

import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||out - ref|| / ||ref||, in fp64 (a zero ``ref`` counts as 1e-30)."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def within_tolerance(err: float, dtype: torch.dtype, torch_err: Optional[float] = None) -> bool:
    """Whether a kernel's relative error ``err`` in ``dtype`` passes: ``err <= TOL[dtype]``, and in bf16 also
    ``err <= 2 * torch_err`` (PyTorch's own error in bf16, plus 1e-6 of slack) when ``torch_err`` is given."""
    ok = err <= TOL[dtype]
    if dtype == torch.bfloat16 and torch_err is not None:
        ok = ok and err <= 2 * torch_err + 1e-6
    return ok


def attention_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v in fp64, written out (no fused SDPA), scale defaulting to head_dim ** -0.5.
    q, k, v (B, heads, N, head_dim) -> (B, heads, N, head_dim) float64."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(s, -1) @ v.double()


# ------------------------------------------------------------------------------------------ inputs
# Fresh random inputs from a seeded CPU generator (the same values on every device), then moved.

def content_frame_inputs(shape: Sequence[int], dtype: torch.dtype, device, seed: int = 0,
                         logit_scale: float = 3.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(frames, logits), (B, L, C, H, W) each: frames uniform in [-1, 1] (a video), logits normal with
    standard deviation ``logit_scale``."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(tuple(shape), generator=g) * 2 - 1
    logits = torch.randn(tuple(shape), generator=g) * logit_scale
    return frames.to(device, dtype), logits.to(device, dtype)


def decoder_fusion_inputs(shape: Sequence[int], dtype: torch.dtype, device, seed: int = 1,
                          param_dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """[content (B, H, W, C), time_height (B, L, H, C), time_width (B, L, W, C), weight (C,), bias (C,)] for
    ``shape`` = (B, L, H, W, C); the LayerNorm parameters in ``param_dtype`` (default ``dtype``; float32
    as in an autocast model)."""
    b, l, h, w, c = shape
    g = torch.Generator().manual_seed(seed)
    planes = [torch.randn(s, generator=g).to(device, dtype) for s in ((b, h, w, c), (b, l, h, c), (b, l, w, c))]
    weight, bias = 1 + 0.5 * torch.randn(c, generator=g), torch.randn(c, generator=g)
    return planes + [weight.to(device, param_dtype or dtype), bias.to(device, param_dtype or dtype)]


def attention_inputs(shape: Sequence[int], dtype: torch.dtype, device, seed: int = 2,
                     packed: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v), (B, heads, N, head_dim) each, standard normal. ``packed``: as the DiT makes them, strided
    views of one (B, N, 3, heads, head_dim) projection; else three contiguous tensors."""
    b, heads, n, d = shape
    g = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(b, n, 3, heads, d, generator=g).to(device, dtype)
        return tuple(qkv.permute(2, 0, 3, 1, 4))
    return tuple(torch.randn(tuple(shape), generator=g).to(device, dtype) for _ in range(3))


def modulated_layernorm_inputs(shape: Sequence[int], dtype: torch.dtype, device,
                               seed: int = 3) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (B, N, C), shift (B, C), scale (B, C)) for ``shape`` = (B, N, C): x normal with mean 0.5 and
    standard deviation 2; shift and scale as the DiT makes them, column chunks of one (B, 6C) projection
    (strided views)."""
    b, n, c = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g) * 2 + 0.5
    mod = torch.randn(b, 6 * c, generator=g).to(device, dtype)
    return x.to(device, dtype), mod[:, :c], mod[:, c:2 * c]
