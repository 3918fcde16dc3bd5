"""Evaluation metrics: reconstruction PSNR/SSIM, the Frechet distance (FVD's core) and CLIP similarity.

Videos are float tensors (B, L, 3, H, W) in [-1, 1], as everywhere in the trainer.

The Frechet distance between Gaussians N(mu1, S1), N(mu2, S2) is
``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``; ``Tr((S1 S2)^(1/2))`` is computed as the sum of the square
roots of the eigenvalues of the symmetric ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), in float64,
with no scipy needed. Feature statistics accumulate in a :class:`FeatureStats` (sums, so ranks can add theirs).
"""

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Reconstruction PSNR / SSIM live in the engine (its benchmarks compare videos too): one definition.
from engine.quality import psnr, ssim  # noqa: F401


# ------------------------------------------------------------------------------------- Frechet distance


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (numpy or torch, any float dtype)."""
    mu1, mu2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"frechet_distance: shapes do not match: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)}/{tuple(s2.shape)}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    evals, evecs = torch.linalg.eigh(s1)
    sqrt_s1 = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    middle = sqrt_s1 @ s2 @ sqrt_s1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


class FeatureStats:
    """Streaming mean and covariance of feature vectors (float64 sums; ranks merge by adding)."""

    def __init__(self, dim: Optional[int] = None):
        self.n = 0
        self.sum = None if dim is None else torch.zeros(dim, dtype=torch.float64)
        self.outer = None if dim is None else torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().to("cpu", torch.float64).reshape(features.shape[0], -1)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.n:
            if self.sum is None:
                self.sum, self.outer = other.sum.clone(), other.outer.clone()
            else:
                self.sum += other.sum
                self.outer += other.outer
            self.n += other.n
        return self

    def mean_cov(self):
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def frechet_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


def frechet_video_distance(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor],
                           features: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Frechet distance between ``features`` of two sets of video batches. ``features``: any network mapping
    videos (B, L, 3, H, W) in [-1, 1] to (B, F): I3D for FVD (:class:`trainer.i3d.I3DFeatures`)."""
    sa, sb = FeatureStats(), FeatureStats()
    with torch.no_grad():
        for batch in real:
            sa.add(features(batch))
        for batch in fake:
            sb.add(features(batch))
    return frechet_from_stats(sa, sb)


# ------------------------------------------------------------------------------------- CLIP similarity


def _projected(out) -> torch.Tensor:
    """transformers 4 returns the projected embeddings, transformers 5 an output whose pooler_output holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPSimilarity:
    """CLIPSIM: cosine similarity between the CLIP embeddings of each frame and of the caption, averaged over
    frames (x100 is a convention of some papers; we report the plain cosine). ``path``: a local CLIP folder
    (transformers ``CLIPModel`` + its processor/tokenizer files); nothing is downloaded."""

    def __init__(self, path: str, device="cpu"):
        import os

        from transformers import CLIPModel, CLIPTokenizer

        if not os.path.isdir(path):
            raise ValueError(f"CLIP folder not found: {path!r}")
        self.model = CLIPModel.from_pretrained(path).eval().requires_grad_(False).to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.device = torch.device(device)
        vision = self.model.config.vision_config
        self.size = vision.image_size
        # CLIP's own normalisation (OpenAI's constants unless the folder's processor says otherwise).
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """videos (B, L, 3, H, W) in [-1, 1], B captions -> per-clip CLIPSIM (B,)."""
        b, frames = videos.shape[:2]
        pixels = (videos.float().reshape(b * frames, *videos.shape[2:]) + 1) / 2
        pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bicubic", align_corners=False,
                               antialias=True).clamp(0, 1)
        pixels = ((pixels - self.mean) / self.std).to(self.device)
        image = F.normalize(_projected(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        tokens = self.tokenizer(list(captions), padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings,
                                return_tensors="pt").to(self.device)
        text = F.normalize(_projected(self.model.get_text_features(**tokens)), dim=-1)
        return (image.reshape(b, frames, -1) * text[:, None]).sum(-1).mean(1).cpu()
