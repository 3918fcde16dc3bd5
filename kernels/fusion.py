"""Decoder fusion: the CMD decoder's input cube and its first LayerNorm (CMD Eqs. 5-6).

    cube[b, l, h, w, :]   = content[b, h, w, :] + time_height[b, l, h, :] + time_width[b, l, w, :]
    normed[b, l, h, w, :] = LayerNorm(cube[b, l, h, w, :]) * weight + bias

The cube is the first transformer block's residual stream; ``normed`` is that block's pre-norm
output. Position embeddings of the decoder are sums of per-axis terms, so the model folds them into
the three planes before the call: the op needs no position argument and reads only the small planes.
"""

from typing import Tuple

import torch
import torch.nn.functional as F

from kernels._dispatch import use_triton


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


def decoder_fusion(
    content: torch.Tensor,
    time_height: torch.Tensor,
    time_width: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Broadcast sum of the three decoder planes and its LayerNorm in one pass -> (cube, normed)."""
    _check(content, time_height, time_width, weight, bias)
    if use_triton(impl, content, time_height, time_width, op="decoder_fusion", available=False):
        raise AssertionError("unreachable until the Triton kernel lands")
    return decoder_fusion_reference(content, time_height, time_width, weight, bias, eps)
