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

:func:`check_tensors` is the one rule for weights that are not weights (integer tensors, a shape the network
does not have, NaN or inf, a missing or an extra tensor): every place that loads weights into a network (a
model folder's networks, :func:`check_network_weights`; a training checkpoint's model and EMA weights) runs it
before the weights go in, so that nothing casts an integer tensor to float or runs a garbage video silently.
"""

import json
import os
from typing import Iterable, Iterator, List, Mapping, Optional, Set, Tuple

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


# -- the tensors themselves -----------------------------------------------------------------------------

def check_tensors(tensors: Iterable[Tuple[str, "torch.Tensor"]], expected: Mapping[str, "torch.Tensor"],  # noqa: F821
                  where: str, keys: bool = True) -> Set[str]:
    """Weights (``(name, tensor)`` pairs, read one at a time) against the network's own tensors ``expected``
    (its ``state_dict()``; meta tensors suffice: only shapes and dtypes are read). Each tensor must have a
    floating-point dtype where the network's is floating (any precision: loading casts it) and the network's
    dtype otherwise, the network's shape, and finite values; with ``keys``, the names must be the network's,
    none missing and none extra (:func:`check_keys`). A one-line ValueError starting with ``where`` (the file)
    and naming the tensor (and both shapes where they differ). Returns the names seen."""
    seen = set()
    for name, tensor in tensors:
        seen.add(name)
        want = expected.get(name)
        if want is None:
            continue  # an extra tensor: check_keys names it
        if tensor.dtype != want.dtype and not (tensor.is_floating_point() and want.is_floating_point()):
            kind = "floating point" if want.is_floating_point() else _dtype_name(want.dtype)
            raise ValueError(f"{where}: tensor {name!r} has dtype {_dtype_name(tensor.dtype)}, the network "
                             f"needs {kind}")
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, the network's is "
                             f"{tuple(want.shape)}")
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            bad = int((~tensor.isfinite()).sum())
            raise ValueError(f"{where}: tensor {name!r} holds {bad} NaN/inf value(s) of {tensor.numel()}")
    if keys:
        check_keys(seen, expected, where)
    return seen


def check_keys(names: Set[str], expected: Mapping[str, object], where: str) -> None:
    """The tensor names a file holds are the network's: a one-line ValueError naming the first missing or
    extra one (and how many more)."""
    for found, kind in ((sorted(set(expected) - names), "is missing"),
                        (sorted(names - set(expected)), "is not one of the network's (another network's weights?)")):
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ValueError(f"{where}: tensor {found[0]!r} {kind}{more}")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def safetensors_files(folder: str) -> List[str]:
    """The safetensors weight files of a checked network folder (:func:`check_network_folder`): the shards its
    index lists, or its one file."""
    index = os.path.join(folder, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(folder, shard) for shard in sorted(set(json.load(f)["weight_map"].values()))]
    return [os.path.join(folder, WEIGHTS_NAME)]


def read_tensors(path: str) -> Iterator[Tuple[str, "torch.Tensor"]]:  # noqa: F821
    """``(name, tensor)`` of every tensor in a safetensors file, one tensor in memory at a time."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def network_tensors(kind, network_config) -> Mapping[str, "torch.Tensor"]:  # noqa: F821
    """The tensors (names, shapes, dtypes; meta tensors, no memory) of the network ``kind`` (a diffusers model
    class) that ``network_config`` (its config.json, a dict or the folder holding it) builds: what its weight
    files must hold."""
    import torch

    if isinstance(network_config, str):
        with open(os.path.join(network_config, NETWORK_CONFIG)) as f:
            network_config = json.load(f)
    with torch.device("meta"):
        return kind.from_config(dict(network_config)).state_dict()


def check_network_weights(folder: str, expected: Mapping[str, "torch.Tensor"], where: str,  # noqa: F821
                          keys: bool = True) -> None:
    """:func:`check_tensors` over the safetensors weights of one network folder (already checked whole by
    :func:`check_network_folder`): each file's tensors, then (``keys``) their names together. ``where``
    prefixes the file names in messages (e.g. "model folder 'm': autoencoder/")."""
    names: Set[str] = set()
    for path in safetensors_files(folder):
        names |= check_tensors(read_tensors(path), expected, f"{where}{os.path.basename(path)}", keys=False)
    if keys:
        check_keys(names, expected, f"{where}{WEIGHTS_NAME if len(safetensors_files(folder)) == 1 else WEIGHTS_INDEX_NAME}")
