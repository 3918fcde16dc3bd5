"""Building blocks shared by the CMD networks: fixed sin-cos positions, attention, feed-forward."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import cmd_kernels


_SINCOS_CACHE: dict = {}  # (kind, sizes, device, dtype) -> table; a few entries per model and clip size
_SINCOS_CACHE_MAX = 64


def _cached(key: tuple, build):
    """``build()``, kept per ``key`` when every size in it is a plain int and nothing traces or captures:
    the tables are constants, so eager calls (every DiT step) reuse them instead of rebuilding them in fp64;
    under torch.compile / export (sizes may be symbols) and CUDA-graph capture they are built in place."""
    tracing = (torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", lambda: False)()
               or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))
    if tracing or not all(type(v) is int for v in key[1]):
        return build()
    table = _SINCOS_CACHE.get(key)
    if table is None:
        if len(_SINCOS_CACHE) >= _SINCOS_CACHE_MAX:
            _SINCOS_CACHE.clear()
        table = _SINCOS_CACHE[key] = build()
    return table


def _sincos_1d(length: int, dim: int, device, dtype) -> torch.Tensor:
    pos = torch.arange(length, device=device, dtype=torch.float64)
    freq = 1.0 / (10000 ** (torch.arange(dim // 2, device=device, dtype=torch.float64) / (dim / 2)))
    angles = pos[:, None] * freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype)


def sincos_1d(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed sin-cos embedding of positions 0..length-1: (length, dim), computed in fp64 once per
    (length, dim, device, dtype) and reused (treat it as read-only)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    return _cached(("1d", (length, dim), str(torch.device(device or "cpu")), dtype),
                   lambda: _sincos_1d(length, dim, device, dtype))


def sincos_2d(height: int, width: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, half the channels for rows and half for columns: (height, width, dim),
    reused like :func:`sincos_1d`'s. Works for any grid, square or not (the official code assumed
    sqrt(N) x sqrt(N))."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")

    def build():
        rows = sincos_1d(height, dim // 2, device, dtype)
        cols = sincos_1d(width, dim // 2, device, dtype)
        return torch.cat([rows[:, None, :].expand(height, width, -1), cols[None, :, :].expand(height, width, -1)], -1)

    return _cached(("2d", (height, width, dim), str(torch.device(device or "cpu")), dtype), build)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(..., C, H, W) -> (..., H/p, W/p, p*p*C): non-overlapping patches, channels last."""
    *lead, c, h, w = x.shape
    x = x.reshape(*lead, c, h // p, p, w // p, p)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)  # (..., H', W', p, p, C)
    return x.reshape(*lead, h // p, w // p, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(..., H', W', p*p*C) -> (..., C, H'*p, W'*p); the inverse of ``patchify``."""
    *lead, hp, wp, _ = x.shape
    x = x.reshape(*lead, hp, wp, p, p, c)
    n = len(lead)
    x = x.permute(*range(n), n + 4, n, n + 2, n + 1, n + 3)  # (..., C, H', p, W', p)
    return x.reshape(*lead, c, hp * p, wp * p)


class Attention(nn.Module):
    """Multi-head self-attention on (batch, tokens, dim); qkv with bias as in timm's Attention."""

    def __init__(self, dim: int, num_heads: int, use_motion_kernel: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # The DiT's attention is our Triton op; the AE's short time/space attentions use SDPA.
        self.attend = cmd_kernels.motion_attention if use_motion_kernel else F.scaled_dot_product_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = self.attend(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    """Feed-forward d -> 2*h (value, gate) -> value * GELU(gate) -> d, as in the CMD/PVDM blocks."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        inner = int(dim * mlp_ratio)
        self.fc_in = nn.Linear(dim, 2 * inner)
        self.fc_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(value * F.gelu(gate))


class SpaceTimeBlock(nn.Module):
    """Divided space-time attention block on (B, L, H', W', C): time attention at each location, space
    attention within each frame, then the feed-forward, all pre-LayerNorm residuals.

    ``normed`` lets a caller hand in norm_time(x) computed elsewhere (the decoder's fused input op)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_time = nn.LayerNorm(dim)
        self.attn_time = Attention(dim, num_heads)
        self.norm_space = nn.LayerNorm(dim)
        self.attn_space = Attention(dim, num_heads)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, normed: torch.Tensor = None) -> torch.Tensor:
        b, l, h, w, c = x.shape
        t = self.norm_time(x) if normed is None else normed
        t = t.permute(0, 2, 3, 1, 4).reshape(b * h * w, l, c)
        x = x + self.attn_time(t).reshape(b, h, w, l, c).permute(0, 3, 1, 2, 4)
        s = self.norm_space(x).reshape(b * l, h * w, c)
        x = x + self.attn_space(s).reshape(b, l, h, w, c)
        return x + self.ff(self.norm_ff(x))


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps -> vectors: sinusoidal features, then a two-layer MLP (as in DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))
