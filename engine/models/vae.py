"""The image VAE of latent mode: every frame is encoded and decoded on its own by a diffusers
``AutoencoderKL``, in chunks of frames to bound memory; latents are multiplied by the VAE's
``scaling_factor`` (0.18215 for SD) as Stable Diffusion does."""

import os
from typing import Any, Dict

import torch
from diffusers import AutoencoderKL

from engine.logs import quiet_loading


def build_vae(vae_kwargs: Dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL(**vae_kwargs)


@quiet_loading("diffusers")
def load_vae(path: str) -> AutoencoderKL:
    """The VAE of a local Stable Diffusion folder (``path/vae``) or a bare VAE folder."""
    if not os.path.isdir(path):
        raise ValueError(f"VAE folder not found: {path!r}")
    sub = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
    return AutoencoderKL.from_pretrained(path, subfolder=sub)


@torch.no_grad()
def encode_frames(vae: AutoencoderKL, video: torch.Tensor, chunk: int = 8, sample: bool = False,
                  generator: torch.Generator = None) -> torch.Tensor:
    """RGB video (B, L, 3, H, W) in [-1, 1] -> scaled latents (B, L, c, H/8, W/8).
    ``sample``: draw from the posterior (training, as the official code) instead of taking its mean."""
    b, frames = video.shape[:2]
    flat = video.reshape(b * frames, *video.shape[2:]).to(vae.dtype)
    outs = []
    for part in flat.split(chunk):
        dist = vae.encode(part).latent_dist
        outs.append(dist.sample(generator) if sample else dist.mode())
    latents = torch.cat(outs) * vae.config.scaling_factor
    return latents.reshape(b, frames, *latents.shape[1:])


@torch.no_grad()
def decode_frames(vae: AutoencoderKL, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Scaled latents (B, L, c, h, w) -> RGB video (B, L, 3, 8h, 8w) in [-1, 1], ``chunk`` frames at a time."""
    b, frames = latents.shape[:2]
    flat = latents.reshape(b * frames, *latents.shape[2:]).to(vae.dtype) / vae.config.scaling_factor
    video = torch.cat([vae.decode(part).sample for part in flat.split(chunk)])
    return video.reshape(b, frames, *video.shape[1:])
