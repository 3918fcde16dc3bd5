"""Sample videos during training, from the EMA weights, so a run can be watched as it goes.

    autoencoder  reconstructions of a fixed batch (top row: input, bottom row: reconstruction)
    content      content frames sampled from the batch's captions (top row: the encoder's content frames)
    motion       videos decoded from the batch's real content frames and motion latents sampled from the
                 captions (top row: the autoencoder's reconstruction of the clip, bottom row: generated)

The content and motion loops are the engine's own (``CMDPipeline.generate_content`` / ``generate_motion``:
the same schedulers, CFG and clamping the engine samples with). Written as GIF (Pillow, no ffmpeg
needed) or PNG for single frames, atomically.
"""

import os
from typing import Dict

import numpy as np
import torch

from engine.atomic import atomic_path
from engine.models import CMDModel
from engine.pipeline import CMDPipeline
from engine.request import check_request


def grid(rows) -> np.ndarray:
    """Rows of videos (each (B, L, 3, H, W) in [-1, 1]) -> uint8 frames (L, rows*H, B*W, 3)."""
    out = []
    for videos in rows:
        v = ((videos.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        v = v.permute(1, 3, 0, 4, 2)  # (L, H, B, W, 3)
        out.append(v.reshape(v.shape[0], v.shape[1], -1, 3))
    return torch.cat(out, dim=1).numpy()


def write_frames(frames: np.ndarray, path: str, fps: int = 8) -> str:
    """uint8 (L, H, W, 3) -> path.gif (or path.png for one frame), written atomically; returns the path.
    The GIF goes through the engine's one video writer (:func:`engine.video_io.write_video`): one stored
    frame per frame, where Pillow merges repeated frames (a still preview would lose its length)."""
    import imageio.v3 as iio

    from engine.video_io import write_video

    path = path + (".png" if frames.shape[0] == 1 else ".gif")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if frames.shape[0] > 1:
        return write_video(path, frames, fps=fps)
    with atomic_path(path, suffix=".png") as tmp:
        iio.imwrite(tmp, frames[0])
    return path


def _pipeline(stage, net: torch.nn.Module) -> CMDPipeline:
    """An engine pipeline over the stage's frozen networks with ``net`` (the EMA copy) in the trained
    slot; the training model itself is not handed over (the pipeline freezes what it is given)."""
    m = stage.model
    nets = {name: getattr(m, name) for name in ("autoencoder", "motion_dit", "content_unet", "vae")}
    nets[stage.network_name] = net
    return CMDPipeline(CMDModel(m.config, **nets), text_encoder=None)


@torch.no_grad()
def preview(stage, net: torch.nn.Module, batch: Dict, seed: int = 0) -> np.ndarray:
    """uint8 frames of a preview grid for ``stage`` using ``net`` (the EMA copy of the trained network)."""
    cfg = stage.cfg
    pipe = _pipeline(stage, net)
    to_rgb = lambda x: pipe.decode_latents(*x) if isinstance(x, tuple) else x  # noqa: E731
    if stage.name == "autoencoder":
        x = stage.prepare(batch)["video"]
        content, motion = net.encode(x)
        real = x if cfg.space == "pixel" else _vae_decode(stage, x)
        return grid([real, to_rgb((content, motion))])

    inputs = stage.prepare(batch)
    content = inputs["content"]
    generator = torch.Generator().manual_seed(seed)
    req = check_request(cfg)  # the config's sampling defaults
    if stage.name == "content":
        noise = torch.randn(content.shape, generator=generator)
        xbar = pipe.generate_content(inputs["states"], inputs["null_states"], noise, req.steps, req.guidance,
                                     req.scheduler)
        if cfg.space == "latent":
            return grid([_vae_decode(stage, content[:, None]), _vae_decode(stage, xbar[:, None])])
        return grid([content[:, None], xbar[:, None]])

    noise = torch.randn(inputs["motion"].shape, generator=generator)
    z = pipe.generate_motion(content, inputs["pooled"], noise, req.motion_steps, req.motion_guidance, req.scheduler)
    return grid([to_rgb((content, inputs["motion"])), to_rgb((content, z))])


def _vae_decode(stage, latents: torch.Tensor) -> torch.Tensor:
    from engine.models.vae import decode_frames

    return decode_frames(stage.model.vae, latents).float()
