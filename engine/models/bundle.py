"""One CMD model on disk and in memory: its config and its networks.

Folder layout (each network a diffusers-style folder: ``config.json`` + safetensors weights)::

    cmd_config.json      the whole CMDConfig (engine/configs.py)
    autoencoder/         CMDAutoencoder
    motion_dit/          MotionDiT
    content_unet/        UNet2DConditionModel
    vae/                 AutoencoderKL (latent mode only)

The text encoder is not stored: the config names it (MiniLM from its package, or a local CLIP folder).
"""

import os
import shutil
import tempfile
from typing import Optional

import torch
import torch.nn as nn
from diffusers import AutoencoderKL, UNet2DConditionModel

from engine.configs import CMDConfig, load_config
from engine.logs import quiet_loading
from engine.models.autoencoder import CMDAutoencoder
from engine.models.content import build_content_unet
from engine.models.motion_dit import MotionDiT
from engine.models.vae import build_vae

CONFIG_FILE = "cmd_config.json"
NETWORKS = ("autoencoder", "motion_dit", "content_unet", "vae")


def build_autoencoder(cfg: CMDConfig) -> CMDAutoencoder:
    a = cfg.autoencoder
    if a.in_channels != cfg.channels:
        raise ValueError(f"autoencoder.in_channels {a.in_channels} != channels {cfg.channels}")
    return CMDAutoencoder(in_channels=a.in_channels, patch_size=a.patch_size, hidden_size=a.hidden_size,
                          encoder_depth=a.encoder_depth, decoder_depth=a.decoder_depth, num_heads=a.num_heads,
                          motion_dim=a.motion_dim, mlp_ratio=a.mlp_ratio, pixel_output=a.pixel_output)


def build_motion_dit(cfg: CMDConfig) -> MotionDiT:
    m = cfg.motion_dit
    return MotionDiT(motion_channels=cfg.autoencoder.motion_dim, content_channels=cfg.channels,
                     text_dim=cfg.text_encoder.hidden_size, depth=m.depth, hidden_size=m.hidden_size,
                     num_heads=m.num_heads, patch_size=m.patch_size, content_patch_size=m.content_patch_size,
                     mlp_ratio=m.mlp_ratio)


class CMDModel(nn.Module):
    """The networks of one CMD model. ``vae`` is None in pixel mode."""

    def __init__(self, config: CMDConfig, autoencoder: CMDAutoencoder, motion_dit: MotionDiT,
                 content_unet: UNet2DConditionModel, vae: Optional[AutoencoderKL] = None):
        super().__init__()
        self.config = config
        self.autoencoder = autoencoder
        self.motion_dit = motion_dit
        self.content_unet = content_unet
        self.vae = vae

    @classmethod
    def from_config(cls, config, device=None) -> "CMDModel":
        """Randomly initialised networks for a config (name, path or CMDConfig). ``device="meta"``
        builds shapes only, at any scale, without memory."""
        cfg = config if isinstance(config, CMDConfig) else load_config(config)
        with torch.device(device) if device is not None else _nullcontext():
            return cls(cfg, build_autoencoder(cfg), build_motion_dit(cfg), build_content_unet(cfg.content_unet),
                       build_vae(cfg.vae) if cfg.space == "latent" else None)

    def save_pretrained(self, path: str) -> None:
        """Write the folder atomically: into a temporary sibling, then one rename."""
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-cmd-", dir=parent)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; a model folder is readable like any output
        try:
            self.config.save(os.path.join(tmp, CONFIG_FILE))
            for name in NETWORKS:
                net = getattr(self, name)
                if net is not None:
                    net.save_pretrained(os.path.join(tmp, name), safe_serialization=True)
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix=".old-cmd-", dir=parent)
                os.rename(path, os.path.join(old, "model"))
                os.rename(tmp, path)
                shutil.rmtree(old)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    @quiet_loading("diffusers")
    def from_pretrained(cls, path: str, torch_dtype: Optional[torch.dtype] = None) -> "CMDModel":
        """Load a model folder written by ``save_pretrained`` (safetensors only, nothing unpickled)."""
        config_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise ValueError(f"not a CMD model folder (no {CONFIG_FILE}): {path!r}")
        cfg = load_config(config_path)
        kinds = {"autoencoder": CMDAutoencoder, "motion_dit": MotionDiT, "content_unet": UNet2DConditionModel,
                 "vae": AutoencoderKL}
        nets = {}
        for name, kind in kinds.items():
            if name == "vae" and cfg.space != "latent":
                nets[name] = None
                continue
            sub = os.path.join(path, name)
            if not os.path.isdir(sub):
                raise ValueError(f"model folder {path!r} lacks its {name}/ network")
            try:
                nets[name] = kind.from_pretrained(sub, torch_dtype=torch_dtype, use_safetensors=True)
            except Exception as e:  # diffusers raises many kinds; say which file is bad
                raise ValueError(f"cannot load {name} weights from {sub!r}: {str(e).splitlines()[0]}") from None
        return cls(cfg, **nets)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
