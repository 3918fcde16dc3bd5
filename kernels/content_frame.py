"""Content-frame projection: a per-pixel softmax-over-time weighted sum of the frames (CMD Eq. 3).

    xbar[b, c, h, w] = sum_l softmax_l(logits[b, :, c, h, w])[l] * frames[b, l, c, h, w]

The softmax is computed in fp32 whatever the input dtype; the result has the frames' dtype.
"""

import torch

from kernels._dispatch import use_triton


def content_frame_reference(frames: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """PyTorch reference. frames, logits: (B, L, C, H, W) -> (B, C, H, W)."""
    weights = torch.softmax(logits.float(), dim=1)
    return (weights * frames.float()).sum(dim=1).to(frames.dtype)


def _check(frames: torch.Tensor, logits: torch.Tensor) -> None:
    if frames.dim() != 5 or frames.shape != logits.shape:
        raise ValueError(
            f"content_frame expects frames and logits of one shape (B, L, C, H, W), "
            f"got {tuple(frames.shape)} and {tuple(logits.shape)}"
        )


def content_frame(frames: torch.Tensor, logits: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Content frame of a video: (B, L, C, H, W) frames and importance logits -> (B, C, H, W)."""
    _check(frames, logits)
    if use_triton(impl, frames, logits, op="content_frame", available=False):
        raise AssertionError("unreachable until the Triton kernel lands")
    return content_frame_reference(frames, logits)
