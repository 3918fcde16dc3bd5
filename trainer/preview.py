"""Sample videos during training, from the EMA weights, so a run can be watched as it goes.

    autoencoder  reconstructions of a fixed batch (top row: input, bottom row: reconstruction)
    content      content frames sampled from the batch's captions (DDIM + classifier-free guidance)
    motion       videos decoded from the batch's real content frames and motion latents sampled from the
                 captions (top row: input, bottom row: generated)

Written as GIF (Pillow, no ffmpeg needed) or PNG for single frames, atomically.
"""

import dataclasses
import os
import tempfile
from typing import Callable, Dict, Optional

import numpy as np
import torch
from diffusers import DDIMScheduler

from engine.models.vae import decode_frames


@torch.no_grad()
def ddim_sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape, section, steps: int,
                generator: torch.Generator, device, clip_sample: bool = True) -> torch.Tensor:
    """Plain DDIM loop: ``denoise(x_t, t)`` returns the model output of the section's prediction type."""
    kwargs = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
    scheduler = DDIMScheduler(**kwargs, clip_sample=clip_sample)
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=generator, device=generator.device).to(device)
    for t in scheduler.timesteps:
        x = scheduler.step(denoise(x, t.to(device)), t, x).prev_sample
    return x


def guided(fn_cond, fn_uncond, scale: float):
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    def denoise(x, t):
        cond, uncond = fn_cond(x, t), fn_uncond(x, t)
        return uncond + scale * (cond - uncond)
    return denoise


def to_pixels(model, x: torch.Tensor) -> torch.Tensor:
    """AE-space video (B, L, C, H, W) -> RGB video in [-1, 1] (VAE decode in latent mode)."""
    if model.config.space == "latent":
        x = decode_frames(model.vae, x.to(next(model.vae.parameters()).dtype))
    return x.float().clamp(-1, 1)


def grid(rows) -> np.ndarray:
    """Rows of videos (each (B, L, 3, H, W) in [-1, 1]) -> uint8 frames (L, rows*H, B*W, 3)."""
    out = []
    for videos in rows:
        v = ((videos.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        v = v.permute(1, 3, 0, 4, 2)  # (L, H, B, W, 3)
        out.append(v.reshape(v.shape[0], v.shape[1], -1, 3))
    return torch.cat(out, dim=1).numpy()


def write_frames(frames: np.ndarray, path: str, fps: int = 8) -> str:
    """uint8 (L, H, W, 3) -> path.gif (or path.png for one frame), written atomically; returns the path."""
    import imageio.v3 as iio

    path = path + (".png" if frames.shape[0] == 1 else ".gif")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=parent)
    os.close(fd)
    try:
        if frames.shape[0] == 1:
            iio.imwrite(tmp, frames[0])
        else:
            iio.imwrite(tmp, frames, duration=int(1000 / fps), loop=0)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


@torch.no_grad()
def preview(stage, net: torch.nn.Module, batch: Dict, seed: int = 0, steps: Optional[int] = None) -> np.ndarray:
    """uint8 frames of a preview grid for ``stage`` using ``net`` (the EMA copy of the trained network)."""
    model, cfg, device = stage.model, stage.cfg, stage.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if stage.name == "autoencoder":
        x = stage.prepare(batch)["video"]
        return grid([to_pixels(model, x), to_pixels(model, net(x))])

    inputs = stage.prepare(batch)
    content = inputs["content"]
    b = content.shape[0]
    if stage.name == "content":
        states = inputs["states"]
        null = stage.null_states(b)
        scale = float(cfg.sampling.get("guidance", 4.0))
        fn = guided(lambda x, t: net(x, t, encoder_hidden_states=states).sample,
                    lambda x, t: net(x, t, encoder_hidden_states=null).sample, scale)
        xbar = ddim_sample(fn, content.shape, cfg.content_scheduler, steps or int(cfg.sampling.get("steps", 25)),
                           generator, device, clip_sample=cfg.space == "pixel")
        return grid([to_pixels(model, content[:, None]), to_pixels(model, xbar[:, None])])

    pooled = inputs["pooled"]
    scale = float(cfg.sampling.get("motion_guidance", 2.0))
    fn = guided(lambda z, t: net(z, t, content, text=pooled), lambda z, t: net(z, t, content, text=None), scale)
    z = ddim_sample(fn, inputs["motion"].shape, cfg.motion_scheduler,
                    steps or int(cfg.sampling.get("motion_steps", 25)), generator, device)
    ae = model.autoencoder
    real = ae.decode(content, inputs["motion"])
    return grid([to_pixels(model, real), to_pixels(model, ae.decode(content, z))])
