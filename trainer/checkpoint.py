"""Training checkpoints: safetensors for weights, EMA weights, optimizer state and RNG state, plus a
small JSON file for everything else. Nothing is ever unpickled.

A checkpoint is a folder ``<root>/step-<N>/``::

    model.safetensors       the trained network's weights
    ema.safetensors         its exponential moving average
    optimizer.safetensors   the optimizer's per-parameter tensors (AdamW moments and step counts)
    rng.safetensors         RNG states of every process ("<name>.<rank>"): the trainer's noise generator,
                            torch's global CPU and CUDA generators, numpy's and Python's global generators
                            (:func:`global_rng_states`), and the data loader's generator
    state.json              step, optimizer param groups, EMA update count, anything else the trainer adds
                            (``data_batches``: loader batches each process had taken, for the data position)

The folder is written with ``engine.atomic.atomic_dir``: under a temporary name, every file fsynced, renamed
into place in one step, then the root folder fsynced; so a crash during a save leaves the previous
checkpoints untouched and no half-written ``step-*`` folder (a hard kill may leave a ``.tmp-step-*`` folder
beside them, which nothing reads). Saving a step that exists already (after a resume) moves the old folder
aside first: a hard kill between the two renames leaves the checkpoints before it. The last ``keep``
checkpoints are kept.
"""

import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.atomic import atomic_dir, write_json

STEP_DIR = re.compile(r"^step-(\d+)$")


def _save_tensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    # safetensors wants contiguous CPU tensors that share no memory.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, path)


def global_rng_states() -> Dict[str, torch.Tensor]:
    """This process's global random states as tensors (safetensors holds tensors only):

    ``torch_cpu`` (uint8, torch.get_rng_state), ``torch_cuda`` (uint8, the current device's; only with CUDA),
    ``numpy`` (int64: position, has-gauss flag, the 624 MT19937 words), ``numpy_gauss`` (float64 (1,)),
    ``python`` (int64: the 625 words of random.getstate) and ``python_gauss`` (float64 (2,): flag, value).
    """
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    if version != 3:
        raise RuntimeError(f"unknown Python random state version {version}")
    states = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": torch.tensor([pos, has_gauss, *keys.tolist()], dtype=torch.int64),
        "numpy_gauss": torch.tensor([gauss], dtype=torch.float64),
        "python": torch.tensor(words, dtype=torch.int64),
        "python_gauss": torch.tensor([gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def set_global_rng_states(states: Dict[str, torch.Tensor]) -> None:
    """Restore what :func:`global_rng_states` returned; keys that are absent are left as they are (a
    checkpoint written before numpy/Python states were saved, CUDA states on a CPU machine)."""
    if "torch_cpu" in states:
        torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])
    if "numpy" in states:
        v = states["numpy"].tolist()
        gauss = float(states["numpy_gauss"][0]) if "numpy_gauss" in states else 0.0
        np.random.set_state(("MT19937", np.asarray(v[2:], dtype=np.uint32), int(v[0]), int(v[1]), gauss))
    if "python" in states:
        flag, value = states["python_gauss"].tolist() if "python_gauss" in states else (0.0, 0.0)
        random.setstate((3, tuple(int(w) for w in states["python"].tolist()), value if flag else None))


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without touching the global random states (sample previews during training: a run
    that writes samples draws the same training noise as one that does not)."""
    saved = global_rng_states()
    try:
        yield
    finally:
        set_global_rng_states(saved)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors ("<param index>.<key>") and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor],
                           meta: Dict[str, Any]) -> None:
    state: Dict[int, Dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def list_checkpoints(root: str) -> List[Tuple[int, str]]:
    """(step, path) of the complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> Optional[str]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str, step: int, model_state: Dict[str, torch.Tensor], ema_state: Dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, rng: Dict[str, torch.Tensor], extra: Dict[str, Any],
                    keep: int = 3) -> str:
    """Write ``<root>/step-<step>`` atomically and prune all but the newest ``keep`` checkpoints."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    with atomic_dir(final) as tmp:  # the same step saved again (after a resume) replaces the old folder
        _save_tensors(model_state, os.path.join(tmp, "model.safetensors"))
        _save_tensors(ema_state, os.path.join(tmp, "ema.safetensors"))
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        _save_tensors(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        _save_tensors(rng, os.path.join(tmp, "rng.safetensors"))
        write_json(os.path.join(tmp, "state.json"), {"step": step, "optimizer": opt_meta, **extra}, indent=1)
    for _, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Read a checkpoint folder: returns {"model", "ema", "rng": tensor dicts, "state": the JSON};
    loads the optimizer state in place when one is given."""
    state_path = os.path.join(path, "state.json")
    if not os.path.isfile(state_path):
        raise ValueError(f"not a complete checkpoint (no state.json): {path!r}")
    with open(state_path) as f:
        state = json.load(f)
    out = {"state": state}
    for name in ("model", "ema", "rng"):
        out[name] = load_file(os.path.join(path, f"{name}.safetensors"))
    if optimizer is not None:
        optimizer_from_tensors(optimizer, load_file(os.path.join(path, "optimizer.safetensors")), state["optimizer"])
    return out
