"""One CMD model on disk and in memory: its config and its networks.

Folder layout (each network a diffusers-style folder: ``config.json`` + safetensors weights)::

    cmd_config.json      the whole CMDConfig (engine/configs.py)
    autoencoder/         CMDAutoencoder
    motion_dit/          MotionDiT
    content_unet/        UNet2DConditionModel
    vae/                 AutoencoderKL (latent mode only)

The file names, and the check that every file is there and whole before anything loads, are in
:mod:`engine.model_folder`. The text encoder is not stored: the config names it (MiniLM from its package,
or a local CLIP folder).

Every network is built from its section of the config (:func:`network_kwargs`); diffusers keeps a copy
of those hyper-parameters in each network's ``config.json``, and loading and saving check that the two
agree (:func:`check_network_config`).
"""

import dataclasses
import json
import os
import shutil
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from diffusers import AutoencoderKL, UNet2DConditionModel

from engine.atomic import atomic_dir
from engine.configs import CMDConfig, load_config
from engine.logs import quiet_loading
from engine.model_folder import (CONFIG_FILE, NETWORK_CONFIG, NETWORKS, check_model_folder, check_network_weights,
                                 network_tensors, required_networks)
from engine.text_files import read_json
from engine.models.autoencoder import CMDAutoencoder
from engine.models.motion_dit import MotionDiT

CLASSES = {"autoencoder": CMDAutoencoder, "motion_dit": MotionDiT, "content_unet": UNet2DConditionModel,
           "vae": AutoencoderKL}
# Machine-specific keys diffusers writes into a network's config.json; never saved (see _save_network).
_UNSAVED_KEYS = ("_name_or_path",)


def network_sources(cfg: CMDConfig, name: str) -> Dict[str, Tuple[str, Any]]:
    """``{constructor argument: (where in the CMDConfig it comes from, value)}`` for network ``name``
    ("autoencoder", "motion_dit", "content_unet", "vae"): the one source of every network's
    hyper-parameters is its config section (the motion DiT also reads the channels of the autoencoder,
    the clip and the text encoder it works with)."""
    if name == "autoencoder":
        return {k: (f"autoencoder.{k}", v) for k, v in dataclasses.asdict(cfg.autoencoder).items()}
    if name == "motion_dit":
        section = {k: (f"motion_dit.{k}", v) for k, v in dataclasses.asdict(cfg.motion_dit).items() if k != "size"}
        return dict(section, motion_channels=("autoencoder.motion_dim", cfg.autoencoder.motion_dim),
                    content_channels=("channels", cfg.channels),
                    text_dim=("text_encoder.hidden_size", cfg.text_encoder.hidden_size))
    if name == "content_unet":
        return {k: (f"content_unet.{k}", v) for k, v in cfg.content_unet.items()}
    if name == "vae":
        if cfg.vae is None:
            raise ValueError(f"config {cfg.name!r} is in pixel space: it has no vae")
        return {k: (f"vae.{k}", v) for k, v in cfg.vae.items()}
    raise ValueError(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")


def network_kwargs(cfg: CMDConfig, name: str) -> Dict[str, Any]:
    """The constructor arguments of network ``name`` from its config section (:func:`network_sources`)."""
    return {k: v for k, (_, v) in network_sources(cfg, name).items()}


def build_network(cfg: CMDConfig, name: str) -> nn.Module:
    """A randomly initialised network ``name`` built from its config section."""
    if name == "autoencoder" and cfg.autoencoder.in_channels != cfg.channels:
        raise ValueError(f"autoencoder.in_channels {cfg.autoencoder.in_channels} != channels {cfg.channels}")
    return CLASSES[name](**network_kwargs(cfg, name))


def build_autoencoder(cfg: CMDConfig) -> CMDAutoencoder:
    return build_network(cfg, "autoencoder")


def build_motion_dit(cfg: CMDConfig) -> MotionDiT:
    return build_network(cfg, "motion_dit")


def _json(value):
    return json.loads(json.dumps(value))  # tuples and lists, ints and floats compare as JSON holds them


def check_network_config(cfg: CMDConfig, name: str, network_config: Mapping[str, Any], where: str) -> None:
    """A model stores each network's hyper-parameters twice: in ``cmd_config.json`` and in the network's
    own ``config.json`` (``network_config``). A one-line ValueError naming the first key where they
    disagree (``where``: the folder, for the message)."""
    for key, (source, want) in network_sources(cfg, name).items():
        got = network_config.get(key, "<missing>")
        if _json(got) != _json(want):
            raise ValueError(f"{where}: {name}/{NETWORK_CONFIG} has {key}={_json(got)!r} but {CONFIG_FILE} has "
                             f"{source}={_json(want)!r}; the copies must agree")


def _save_network(net: nn.Module, path: str) -> None:
    """diffusers' save (config.json + safetensors), without the keys that describe the saving machine."""
    net.save_pretrained(path, safe_serialization=True)
    config_path = os.path.join(path, NETWORK_CONFIG)
    with open(config_path) as f:
        data = json.load(f)
    if any(k in data for k in _UNSAVED_KEYS):
        for key in _UNSAVED_KEYS:
            data.pop(key, None)
        with open(config_path, "w") as f:  # inside the model's temporary folder: renamed into place whole
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


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
            return cls(cfg, *(build_network(cfg, name) if name != "vae" or cfg.space == "latent" else None
                              for name in NETWORKS))

    def save_pretrained(self, path: str) -> None:
        """Write the folder atomically and durably (``engine.atomic.atomic_dir``): a failure leaves any
        folder at ``path`` as it was. Over an existing folder, what it holds besides a model's own files
        (``cmd_config.json`` and the network folders), e.g. a model card, is kept. A ValueError, before
        anything is written, when ``path`` is a file or a network's hyper-parameters disagree with the
        config's."""
        for name in NETWORKS:
            if getattr(self, name) is not None:
                check_network_config(self.config, name, getattr(self, name).config, "cannot save the model")
        with atomic_dir(path) as tmp:
            if os.path.isdir(path):
                for entry in sorted(set(os.listdir(path)) - {CONFIG_FILE, *NETWORKS}):
                    src, dst = os.path.join(path, entry), os.path.join(tmp, entry)
                    if os.path.isdir(src):
                        shutil.copytree(src, dst, symlinks=True)
                    else:
                        shutil.copy2(src, dst)
            self.config.save(os.path.join(tmp, CONFIG_FILE))
            for name in NETWORKS:
                net = getattr(self, name)
                if net is not None:
                    _save_network(net, os.path.join(tmp, name))

    @classmethod
    @quiet_loading("diffusers")
    def from_pretrained(cls, path: str, torch_dtype: Optional[torch.dtype] = None) -> "CMDModel":
        """Load a model folder written by ``save_pretrained`` (safetensors only, nothing unpickled). A
        one-line ValueError naming the folder and the file, before any network loads, when a file is missing
        or truncated (:func:`engine.model_folder.check_model_folder`) or a network's hyper-parameters
        disagree with the config's, or a weight is not one of the network's (an integer tensor, another shape,
        NaN/inf, a missing or an extra tensor: :func:`engine.model_folder.check_tensors`)."""
        cfg = check_model_folder(path)
        names = required_networks(cfg)
        network_configs = {}
        for name in names:  # every network's copy of the config before any weights: a clear error, not a shape one
            network_configs[name] = read_json(os.path.join(path, name, NETWORK_CONFIG), "network config")
            check_network_config(cfg, name, network_configs[name], path)
        for name in names:  # then every tensor, before any network loads
            check_network_weights(os.path.join(path, name), network_tensors(CLASSES[name], network_configs[name]),
                                  f"model folder {path!r}: {name}/")
        nets = {name: None for name in NETWORKS}
        for name in names:
            kind, sub = CLASSES[name], os.path.join(path, name)
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
