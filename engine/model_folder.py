"""The files of a model folder, and their check before any weights load.

A CMD model folder (written by ``engine.models.CMDModel.save_pretrained``)::

    cmd_config.json      the whole CMDConfig (engine/configs.py)
    autoencoder/  motion_dit/  content_unet/  [vae/, latent mode only]
        config.json                              diffusers' copy of the network's hyper-parameters
        diffusion_pytorch_model.safetensors      its weights (or, sharded, the .safetensors.index.json
                                                 and the shards it lists)

:func:`check_model_folder` finds a missing, empty or truncated file of that layout with one line naming
the folder and the file, before anything heavy is imported or loaded; every loader of a model folder
(``engine.default_model.resolve_model``, ``CMDModel.from_pretrained``) runs it, so diffusers never gets
to print its own error lines for such a folder. :func:`check_network_folder` does the same for one
diffusers network folder (a Stable Diffusion UNet or VAE given to the trainer). Imports no torch: a
safetensors header is read with the safetensors library's numpy side.
"""

import json
import os
from typing import List, Optional, Tuple

from engine.configs import CMDConfig, load_config

CONFIG_FILE = "cmd_config.json"
NETWORKS = ("autoencoder", "motion_dit", "content_unet", "vae")
# diffusers' file names (diffusers.utils.constants; tests/engine/test_model_folder.py checks they agree).
NETWORK_CONFIG = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
PICKLE_WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.bin.index.json"


def required_networks(cfg: CMDConfig) -> List[str]:
    """The networks a model folder of config ``cfg`` holds: all but the image VAE in pixel mode."""
    return [name for name in NETWORKS if name != "vae" or cfg.space == "latent"]


def _check_safetensors(path: str, what: str, root: str, rel: str) -> None:
    """The header of a safetensors file parses and the file holds every byte it declares (a truncated copy
    fails here, not half-way through loading)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{what} {root!r}: {rel} is not a complete safetensors file ({e})") from None


def check_network_folder(root: str, sub: Optional[str] = None, what: str = "network folder",
                         allow_pickle: bool = False) -> bool:
    """One diffusers network folder (``root/sub``, or ``root``): its ``config.json`` and its weights, one
    safetensors file or the shards its index lists (``allow_pickle``: a ``.bin`` file or shards instead,
    which diffusers also loads). A one-line ValueError naming ``what`` ``root`` and the missing or broken
    file; True when the weights are safetensors (pass it as diffusers' ``use_safetensors``)."""
    folder = os.path.join(root, sub) if sub else root
    prefix = f"{sub}/" if sub else ""
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {root!r} lacks its {sub}/ network" if sub else f"{what} not found: {root!r}")
    if not os.path.isfile(os.path.join(folder, NETWORK_CONFIG)):
        raise ValueError(f"{what} {root!r} is incomplete: {prefix}{NETWORK_CONFIG} is missing")
    formats = [(WEIGHTS_INDEX_NAME, WEIGHTS_NAME, True)]
    if allow_pickle:
        formats.append((PICKLE_WEIGHTS_INDEX_NAME, PICKLE_WEIGHTS_NAME, False))
    for index, single, safe in formats:  # diffusers' order: an index first (sharded), then one file
        if os.path.isfile(os.path.join(folder, index)):
            try:
                with open(os.path.join(folder, index)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{what} {root!r}: cannot read {prefix}{index}: {e}") from None
        elif os.path.isfile(os.path.join(folder, single)):
            shards = [single]
        else:
            continue
        for shard in shards:
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise ValueError(f"{what} {root!r} is incomplete: {prefix}{shard} is missing")
            if safe:
                _check_safetensors(path, what, root, prefix + shard)
        return safe
    names = WEIGHTS_NAME + (f" or {PICKLE_WEIGHTS_NAME}" if allow_pickle else "")
    raise ValueError(f"{what} {root!r} is incomplete: {prefix}{names} is missing")


def find_network_folder(path: str, sub: str, what: str) -> Tuple[Optional[str], bool]:
    """A diffusers network given as a whole Stable Diffusion folder (its ``sub`` folder, e.g. "unet") or as
    the network's own folder: ``(subfolder or None, safetensors)``, checked as :func:`check_network_folder`
    does (``.bin`` weights allowed: diffusers loads Stable Diffusion folders that way too); a one-line
    ValueError naming ``what`` and ``path`` when it is missing or lacks a file."""
    if not os.path.isdir(path):
        raise ValueError(f"{what} not found: {path!r}")
    found = sub if os.path.isdir(os.path.join(path, sub)) else None
    return found, check_network_folder(path, found, what, allow_pickle=True)


def check_model_folder(path: str) -> CMDConfig:
    """A CMD model folder whose every file is there and whole: its config (returned), and per network
    (:func:`required_networks`) its folder, ``config.json`` and safetensors weights. A one-line ValueError
    naming the folder and the first missing or broken file; reads only the config and the weights' headers."""
    if not os.path.exists(path):
        raise ValueError(f"model folder not found: {path!r} (a CMD model folder, 'default' or random:<config>)")
    if not os.path.isdir(path):
        raise ValueError(f"model path is not a folder: {path!r}")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise ValueError(f"not a CMD model folder (no {CONFIG_FILE}): {path!r}")
    cfg = load_config(os.path.join(path, CONFIG_FILE))
    for name in required_networks(cfg):
        check_network_folder(path, name, "model folder")
    return cfg
