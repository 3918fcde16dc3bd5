"""The image VAE of latent mode: every frame is encoded and decoded on its own by a diffusers
``AutoencoderKL``, in chunks of frames to bound memory; latents are multiplied by the VAE's
``scaling_factor`` (0.18215 for SD) as Stable Diffusion does."""

import os
from typing import Any, Callable, Dict

import torch
from diffusers import AutoencoderKL

from engine.logs import quiet_loading
from engine.model_folder import check_network_weights, find_network_folder, network_tensors

# Frames the image VAE encodes or decodes per call: bounds memory; the vae_decoder graph's batch.
VAE_CHUNK = 8


def build_vae(vae_kwargs: Dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL(**vae_kwargs)


def find_vae(path: str):
    """Where :func:`load_vae` finds the network in ``path``: ``(subfolder or None, safetensors)``; a one-line
    ValueError naming the folder and a missing or truncated file (for checking before any weights load)."""
    return find_network_folder(path, "vae", "VAE folder")


@quiet_loading("diffusers")
def load_vae(path: str) -> AutoencoderKL:
    """The VAE of a local Stable Diffusion folder (``path/vae``) or a bare VAE folder."""
    # Its files first (one line naming a missing or truncated one, not diffusers' error lines), and the
    # format found, so that diffusers does not log an error looking for safetensors in a .bin folder.
    sub, safetensors = find_vae(path)
    if safetensors:  # a Stable Diffusion folder's names may be older ones diffusers renames: names not checked
        folder = os.path.join(path, sub or "")
        check_network_weights(folder, network_tensors(AutoencoderKL, folder), f"{folder!r}: ", keys=False)
    try:
        return AutoencoderKL.from_pretrained(path, subfolder=sub, use_safetensors=safetensors)
    except Exception as e:  # diffusers raises many kinds; say which folder is bad
        raise ValueError(f"cannot load {os.path.join(path, sub or '')!r}: {str(e).splitlines()[0]}") from None


def per_frame(fn: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor, chunk: int = VAE_CHUNK) -> torch.Tensor:
    """Run an image network on every frame of a batch of clips, ``chunk`` frames per call to bound memory:
    ``fn`` maps (N, ...) -> (N, ...); ``frames`` (B, L, ...) -> (B, L, ...) of ``fn``'s output. The one
    chunk loop of the image VAE, eager or exported (the graph backends' ``decode_frames``)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of frames, got {chunk!r}")
    b, length = frames.shape[:2]
    flat = frames.reshape(b * length, *frames.shape[2:])
    out = torch.cat([fn(part) for part in flat.split(chunk)])
    return out.reshape(b, length, *out.shape[1:])


@torch.no_grad()
def encode_frames(vae: AutoencoderKL, video: torch.Tensor, chunk: int = VAE_CHUNK, sample: bool = False,
                  generator: torch.Generator = None) -> torch.Tensor:
    """RGB video (B, L, 3, H, W) in [-1, 1] -> scaled latents (B, L, c, H/8, W/8).
    ``sample``: draw from the posterior (training, as the official code) instead of taking its mean."""
    def encode(part):
        dist = vae.encode(part).latent_dist
        return (dist.sample(generator) if sample else dist.mode()) * vae.config.scaling_factor

    return per_frame(encode, video.to(vae.dtype), chunk)


@torch.no_grad()
def decode_frames(vae: AutoencoderKL, latents: torch.Tensor, chunk: int = VAE_CHUNK) -> torch.Tensor:
    """Scaled latents (B, L, c, h, w) -> RGB video (B, L, 3, 8h, 8w) in [-1, 1], ``chunk`` frames at a time."""
    scale = vae.config.scaling_factor
    return per_frame(lambda part: vae.decode(part / scale).sample, latents.to(vae.dtype), chunk)
