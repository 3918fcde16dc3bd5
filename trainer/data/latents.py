"""Latent mode: image-VAE latents of real videos, cached on disk.

The image VAE encodes each frame on its own, so a video's frames can be encoded once and any window of
them reused for every epoch: the cache stores, per video, the latents of all its frames (resized and
centre-cropped to the clip size, like :class:`trainer.data.videos.VideoClips` does), as fp16 safetensors
named by a hash of (file path, size, mtime, clip size, VAE fingerprint). A changed video or VAE gets a new
file; stale files are harmless.

:func:`fill_latent_cache` encodes what is missing (each rank its share under torchrun);
:class:`LatentClips` then serves random windows of cached latents, ``{"latents": (L, c, h, w), "caption"}``,
with no VAE in the data loader. Videos that cannot be decoded are left out of the cache and counted
(:func:`cached_clips`); a cached video shorter than one window gives ``None`` (dropped and counted by the
trainer's collate_clips).
"""

import hashlib
import json
import os
from typing import Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from engine.atomic import atomic_path
from engine.models.vae import encode_frames
from trainer.data.videos import ClipCounts, NoUsableClips, VideoClips, probe_video, read_clip


def vae_fingerprint(vae) -> str:
    """A short hash of the VAE's config and a few weight statistics (a different VAE: a different cache)."""
    h = hashlib.sha1(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for p in list(vae.parameters())[:4] + list(vae.parameters())[-4:]:
            h.update(np.float64(p.double().sum().item()).tobytes())
    return h.hexdigest()[:16]


class LatentCache:
    """Folder of per-video latent files for one VAE and one clip size."""

    def __init__(self, root: str, vae, height: int, width: int, chunk: int = 8, max_frames: int = 1024):
        self.root = root
        self.vae = vae
        self.height, self.width = height, width
        self.chunk = chunk
        self.max_frames = max_frames
        self.fingerprint = vae_fingerprint(vae)
        os.makedirs(root, exist_ok=True)

    def path_for(self, video: str) -> str:
        st = os.stat(video)
        key = f"{os.path.abspath(video)}|{st.st_size}|{st.st_mtime_ns}|{self.height}x{self.width}|{self.fingerprint}"
        return os.path.join(self.root, hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    def has(self, video: str) -> bool:
        try:
            return os.path.isfile(self.path_for(video))
        except OSError:
            return False

    @torch.no_grad()
    def encode(self, video: str) -> Optional[str]:
        """Encode every frame of ``video`` (the first ``max_frames``), centre-cropped to the clip size, into the
        cache; returns the file, or None if it cannot be read. ffmpeg scales the frames while decoding
        (:func:`engine.video_io.read_clip`): no frame is held at its stored size."""
        try:
            target = self.path_for(video)
            count = min(probe_video(video).num_frames, self.max_frames)
            frames = read_clip(video, 0, count, 1, (self.height, self.width))
        except Exception:  # missing or corrupt: the caller counts it
            return None
        device = next(self.vae.parameters()).device
        pixels = torch.from_numpy(frames.copy()).permute(0, 3, 1, 2).float()
        pixels = (pixels / 127.5 - 1.0).clamp(-1, 1)
        latents = encode_frames(self.vae, pixels[None].to(device), chunk=self.chunk)[0]
        with atomic_path(target, suffix=".safetensors") as tmp:
            save_file({"latents": latents.to("cpu", torch.float16).contiguous()}, tmp)
        return target


def fill_latent_cache(clips: VideoClips, cache: LatentCache, rank: int = 0, world_size: int = 1,
                      progress: bool = False) -> Tuple[int, int]:
    """Encode the missing videos of ``clips`` (this rank's round-robin share). Returns (encoded, failed)."""
    todo = [path for i, (path, _) in enumerate(clips.entries) if i % world_size == rank and not cache.has(path)]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="VAE latents", unit="video")
    done = failed = 0
    for path in todo:
        if cache.encode(path) is None:
            failed += 1
        else:
            done += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return done, failed


def cached_clips(clips: VideoClips, cache: LatentCache, counts: ClipCounts) -> VideoClips:
    """The videos of ``clips`` that are in the cache (after :func:`fill_latent_cache` on every rank); the
    others are added to ``counts`` as "unreadable". Raises :class:`NoUsableClips` when none is cached."""
    keep = [entry for entry in clips.entries if cache.has(entry[0])]
    missed = len(clips) - len(keep)
    if missed:
        counts.add("unreadable", f"{missed} of the probed videos could not be decoded for the latent cache", missed)
    if not keep:
        raise NoUsableClips(f"no usable clips in {counts.root!r}: {counts.summary()}")
    return clips.subset(keep)


class LatentClips(Dataset):
    """Random ``num_frames`` windows of cached latents; same windows as ``clips`` would pick (seed, epoch, i)."""

    def __init__(self, clips: VideoClips, cache: LatentCache):
        self.clips = clips
        self.cache = cache

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.clips.set_epoch(epoch)

    def __getitem__(self, index: int):
        path, caption = self.clips.entries[index]
        try:
            latents = load_file(self.cache.path_for(path))["latents"]
        except Exception:  # not cached (unreadable video) or a damaged cache file
            return None
        c = self.clips
        span = (c.num_frames - 1) * c.frame_stride + 1
        if latents.shape[0] < span:
            return None
        rng = np.random.default_rng([c.seed, c.epoch, index])
        start = int(rng.integers(0, latents.shape[0] - span + 1))
        return {"latents": latents[start:start + span:c.frame_stride].float(), "caption": caption}
