"""What export writes and the graph backends read: the ONNX export folder, the TensorRT plan folder,
the weight hashes that tie both to a model, and the cache root they go to by default.

:mod:`engine.networks` declares the networks (names, axes, profiles); this module holds the formats of
the folders built from those declarations, in one place for ``export/`` (the writer) and
``engine/backends/{onnxruntime,tensorrt}.py`` (the readers)::

    <onnx folder>/                      python -m export onnx
        manifest.json                   format FORMAT_VERSION: model (spec, name, weights_sha256 per dtype),
                                        config, precision, opset, max_batch, buckets, versions, networks
                                        (per network: file, hashes, declaration, profiles, op counts),
                                        text_encoder (the tokenizer entry, when the graph is there)
        <network>.onnx [.onnx.data]     one graph per network
        tokenizer/                      a Hugging Face tokenizer, when the text encoder has one
    <plan folder>/                      python -m export tensorrt
        plans.json                      onnx_dir, tensorrt, target (gpu, compute_capability), precision,
                                        options, weights_sha256, onnx_manifest, networks (plan, plan_sha256,
                                        key, profiles)
        <network>-<key>.plan  timing.cache

Default locations: ``$CMD_CACHE/onnx/<config>-<hash>-<precision>`` (``$CMD_CACHE`` defaults to
``~/.cache/cmd-engine``); a runtime takes a folder as an option, else ``$CMD_ONNX_DIR`` /
``$CMD_TRT_DIR``, else (onnxruntime) the export under the cache built from exactly its weights. What can
be known without the weights (the folder named is one; the cache holds exports at all) is checked before a
model loads (:func:`check_export_exists`, through ``engine.backends.check_backend_ready``); the files a backend
will run are checked against the hashes their manifest holds when it opens the folder, before any network
runs (:func:`check_files`).
"""

import hashlib
import json
import os
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from engine.configs import CMDConfig
from engine.geometry import ClipSize
from engine.networks import Network, networks_for

ONNX_DIR_ENV = "CMD_ONNX_DIR"
PLAN_DIR_ENV = "CMD_TRT_DIR"


def cache_root() -> str:
    """Where exported graphs and plans go by default: $CMD_CACHE, else ~/.cache/cmd-engine."""
    return os.environ.get("CMD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cmd-engine")


# -- identities: what a graph or plan was built from -------------------------------------------
HASH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# module -> {dtype: (fingerprint, digest)}: the hash of unchanged weights is computed once (a graph backend
# checks it each time it opens; at SD scale copying every parameter to the CPU and hashing it takes seconds).
_HASHES: "weakref.WeakKeyDictionary[nn.Module, Dict]" = weakref.WeakKeyDictionary()


def _fingerprint(module: nn.Module) -> tuple:
    """What identifies the weights' current values without reading them: per tensor its name, storage
    address, dtype, shape and version counter (bumped by every in-place change: optimizer steps,
    load_state_dict, ``with torch.no_grad(): p.copy_(...)``; not by writes through ``.data``)."""
    return tuple((name, t.data_ptr(), t.dtype, tuple(t.shape), t._version, str(t.device))
                 for name, t in sorted(module.state_dict(keep_vars=True).items()))


def weights_hash(module: nn.Module, dtype: Optional[torch.dtype] = None) -> str:
    """sha256 (64 hex digits) over the names, dtypes, shapes and bytes of a module's parameters and
    buffers: the same weights give the same hash on every machine, any change gives another. ``dtype``:
    hash the floating-point tensors as cast to it (what a model moved to that dtype would hash to).
    Computed once per module, dtype and weight values (:func:`_fingerprint`); a change made through
    ``.data`` is not seen: call :func:`forget_weights_hash` after one."""
    fingerprint = _fingerprint(module)
    known = _HASHES.setdefault(module, {}).get(dtype)
    if known is not None and known[0] == fingerprint:
        return known[1]
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    _HASHES[module][dtype] = (fingerprint, h.hexdigest())
    return h.hexdigest()


def forget_weights_hash(module: nn.Module) -> None:
    """Drop the remembered hashes of ``module`` (after changing weights through ``.data``)."""
    _HASHES.pop(module, None)


def weights_hashes(module: nn.Module) -> Dict[str, str]:
    """``weights_hash`` for each dtype a backend may hold the model in (``HASH_DTYPES``), so that a
    runtime can check, in any dtype, that graphs were built from the weights it holds."""
    return {name: weights_hash(module, dtype) for name, dtype in HASH_DTYPES.items()}


def file_hash(*paths: str, chunk: int = 1 << 22) -> str:
    """sha256 of the files' bytes in order (a graph and its external-data file)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    return h.hexdigest()


def check_files(folder: str, files: Dict[str, Tuple[List[str], Optional[str]]], source: str, remedy: str) -> None:
    """The files a graph backend will run are the ones its manifest was written for: for each network
    ``files[name] = (file names in ``folder``, their sha256 as the manifest holds it)``. A one-line ValueError
    naming the file, before any network runs, when one is missing, truncated or changed (or the manifest
    holds no hash for it: written before hashes were kept), ending in ``remedy``."""
    for name, (names, digest) in files.items():
        paths = [os.path.join(folder, f) for f in names]
        for path in paths:
            if not os.path.isfile(path):
                raise ValueError(f"{source} lack {os.path.basename(path)} (listed for {name}); {remedy}")
        if not digest:
            raise ValueError(f"{source}: the manifest holds no sha256 for {name}'s {' + '.join(names)} (written "
                             f"by an older version); {remedy}")
        if file_hash(*paths) != digest:
            raise ValueError(f"{source}: {' + '.join(names)} changed since it was written (sha256 differs from "
                             f"the manifest's: truncated, edited or replaced); {remedy}")


def graph_files(manifest: Dict, names=None) -> Dict[str, Tuple[List[str], Optional[str]]]:
    """:func:`check_files`' argument for the graphs of an ONNX export folder's manifest (``names``: only
    those networks): each graph with its external-data file, and their ``onnx_sha256``."""
    return {name: ([entry["file"]] + ([entry["external_data"]] if entry.get("external_data") else []),
                   entry.get("onnx_sha256"))
            for name, entry in manifest["networks"].items() if names is None or name in names}


def plan_files(plans: Dict) -> Dict[str, Tuple[List[str], Optional[str]]]:
    """:func:`check_files`' argument for the plans of a plan folder's ``plans.json``."""
    return {name: ([entry["plan"]], entry.get("plan_sha256")) for name, entry in plans["networks"].items()}


def check_weights(hashes: Dict[str, str], model: nn.Module, source: str, remedy: str,
                  digest: Optional[str] = None) -> None:
    """Refuse graphs or plans (``source``, e.g. "the graphs in 'onnx/default'") whose recorded weight
    hashes (``weights_sha256``, per dtype) do not hold ``model``'s (in whatever dtype it is now;
    ``digest``: its ``weights_hash`` if already known): a one-line ValueError ending in ``remedy``."""
    digest = digest or weights_hash(model)
    if digest not in hashes.values():
        raise ValueError(f"{source} were built from other weights than this model (sha256 {digest[:12]}); {remedy}")


# -- the ONNX export folder ---------------------------------------------------------------------
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PRECISIONS = {"float32": torch.float32, "float16": torch.float16}
TOKENIZER_DIR = "tokenizer"
EXPORT_AGAIN = "export this model again: python -m export onnx --model MODEL"


def read_manifest(onnx_dir: str) -> Dict:
    """The manifest of an ONNX export folder; a one-line ValueError if it is not one."""
    path = os.path.join(onnx_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"not an ONNX export folder (no {MANIFEST}): {onnx_dir!r}; "
                         "make one with: python -m export onnx --model MODEL --out DIR")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path!r}: {e}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: export format {manifest.get('format')!r}, this version reads {FORMAT_VERSION}; "
                         "export again")
    return manifest


def networks_from_manifest(manifest: Dict) -> Dict[str, Network]:
    """The declarations the graphs of an export folder were built from, by network name."""
    cfg = CMDConfig.from_dict(manifest["config"])
    buckets = [ClipSize.parse(b) for b in manifest["buckets"]]
    return {n.name: n for n in networks_for(cfg, buckets, manifest["max_batch"], list(manifest["networks"]))}


def cached_exports(root: Optional[str] = None) -> List[Tuple[str, Dict]]:
    """``(folder, manifest)`` of every readable export folder under ``<cache>/onnx``, by name."""
    base = os.path.join(root or cache_root(), "onnx")
    if not os.path.isdir(base):
        return []
    found = []
    for entry in sorted(os.listdir(base)):
        folder = os.path.join(base, entry)
        try:
            found.append((folder, read_manifest(folder)))
        except ValueError:
            continue
    return found


def find_export(model: nn.Module, prefer: str = "float32", root: Optional[str] = None,
                digest: Optional[str] = None) -> Optional[str]:
    """An export folder under ``<cache>/onnx`` built from exactly this model's weights (in the dtype it
    is in now; ``digest``: its ``weights_hash`` if already known), preferring graphs of precision
    ``prefer``; None if there is none."""
    exports = cached_exports(root)
    if not exports:
        return None
    digest = digest or weights_hash(model)
    found = [(manifest["precision"] != prefer, folder) for folder, manifest in exports
             if digest in manifest["model"]["weights_sha256"].values()]
    return min(found)[1] if found else None


def default_export_dir(model: nn.Module, precision: str, root: Optional[str] = None) -> str:
    """Where ``python -m export onnx`` puts a model's graphs unless told: one folder per model
    (config name and weights hash) and precision, under ``<cache>/onnx``."""
    digest = weights_hash(model, torch.float32)[:12]
    return os.path.join(root or cache_root(), "onnx", f"{model.config.name}-{digest}-{precision}")


MAKE_EXPORT = (f"build them with `python -m export onnx --model MODEL`, or name an export folder with "
               f"${ONNX_DIR_ENV} (backend option onnx_dir)")


def check_export_exists(onnx_dir: Optional[str] = None) -> None:
    """What :func:`locate_export` can check before a model loads: the folder named (``onnx_dir``, else
    ``$CMD_ONNX_DIR``) is an export folder; without one, ``<cache>/onnx`` holds at least one. Which cached
    export, if any, holds this model's graphs only its loaded weights tell (their hash). A one-line
    ValueError naming the folder and how to make one otherwise."""
    folder = onnx_dir or os.environ.get(ONNX_DIR_ENV)
    if folder:
        read_manifest(folder)
    elif not cached_exports():
        raise ValueError(f"no ONNX graphs under {os.path.join(cache_root(), 'onnx')!r}: {MAKE_EXPORT}")


def locate_export(model: nn.Module, dtype: torch.dtype, onnx_dir: Optional[str] = None,
                  digest: Optional[str] = None) -> str:
    """The export folder a runtime reads: ``onnx_dir``, else ``$CMD_ONNX_DIR``, else the one under the
    cache built from this model's weights (float16 graphs preferred for a float16 model); a one-line
    ValueError saying how to make one if there is none."""
    if onnx_dir:
        return onnx_dir
    if os.environ.get(ONNX_DIR_ENV):
        return os.environ[ONNX_DIR_ENV]
    digest = digest or weights_hash(model)
    found = find_export(model, prefer="float16" if dtype == torch.float16 else "float32", digest=digest)
    if found is None:
        raise ValueError(f"no ONNX graphs for this model (weights sha256 {digest[:12]}) under "
                         f"{os.path.join(cache_root(), 'onnx')!r}: {MAKE_EXPORT}")
    return found


def tokenizer_entry(text_encoder, out_dir: str) -> Dict:
    """Keep a text encoder's tokenizer with its graph (the manifest's ``text_encoder`` entry), so a runtime
    needs nothing else: a Hugging Face tokenizer is saved to ``out_dir/tokenizer/``; the hashing tokenizer
    of random-weight encoders (:class:`engine.random_text.HashTokenizer`) is described by its vocabulary."""
    from engine.random_text import HashTokenizer

    tok = text_encoder.tokenizer
    entry = {"max_length": int(text_encoder.max_length), "normalize_pooled": bool(text_encoder.normalize_pooled)}
    if isinstance(tok, HashTokenizer):
        entry.update(kind="hash", vocab_size=int(tok.vocab_size))
    elif hasattr(tok, "save_pretrained"):  # any Hugging Face tokenizer
        tok.save_pretrained(os.path.join(out_dir, TOKENIZER_DIR))
        entry.update(kind="huggingface", path=TOKENIZER_DIR)
    else:
        raise ValueError(f"cannot export tokenizer of type {type(tok).__name__}")
    return entry


def load_tokenizer(onnx_dir: str, manifest: Dict):
    """The tokenizer :func:`tokenizer_entry` kept in an export folder; a one-line ValueError if it has none."""
    info = manifest.get("text_encoder")
    if info is None:
        raise ValueError(f"export folder {onnx_dir!r} has no text_encoder graph; export it with the text encoder")
    if info["kind"] == "huggingface":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.path.join(onnx_dir, info["path"]))
    if info["kind"] == "hash":
        from engine.random_text import HashTokenizer

        return HashTokenizer(int(info["vocab_size"]))
    raise ValueError(f"{onnx_dir}: unknown tokenizer kind {info['kind']!r}")


# -- the TensorRT plan folder ---------------------------------------------------------------------
PLANS_MANIFEST = "plans.json"
BUILD_PLANS = "python -m export tensorrt --onnx ONNX_DIR --out DIR"


def read_plans(plan_dir: str, missing_ok: bool = False) -> Dict:
    """``plans.json`` of a plan folder; a one-line ValueError if it is not one (``missing_ok``: an empty
    dict instead, for a folder a build is about to fill)."""
    path = os.path.join(plan_dir, PLANS_MANIFEST)
    if not os.path.isfile(path):
        if missing_ok:
            return {}
        raise ValueError(f"not a TensorRT plan folder (no {PLANS_MANIFEST}): {plan_dir!r}; make one with: "
                         f"{BUILD_PLANS}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path!r}: {e}") from None


def plan_networks(plans: Dict) -> Dict[str, Network]:
    """The declarations of the networks a plan folder has plans for (``plans.json`` as read), by name:
    their buckets are the plans' optimisation profiles, their batch ranges the profiles' batch axes."""
    declared = networks_from_manifest(plans["onnx_manifest"])
    return {name: net for name, net in declared.items() if name in plans.get("networks", {})}


def gpu_identity(device=None) -> Dict[str, str]:
    """Name and compute capability of a CUDA device: what a plan is specific to (``plans.json``'s target)."""
    if not torch.cuda.is_available():
        raise ValueError("TensorRT plans need a CUDA GPU; torch sees none on this machine")
    index = torch.device(device if device is not None else "cuda").index
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def check_plans_runnable(plans: Dict, trt_version: str, gpu: Dict[str, str], plan_dir: str) -> None:
    """Plans are not portable across GPUs or TensorRT versions: refuse them with a clear message."""
    built = {"tensorrt": plans["tensorrt"], **plans["target"]}
    here = {"tensorrt": trt_version, **gpu}
    if built != here:
        diff = ", ".join(f"{k} {built.get(k)!r} (here {here.get(k)!r})" for k in here if built.get(k) != here[k])
        raise ValueError(f"the plans in {plan_dir!r} were built for {diff}; rebuild them here: "
                         f"python -m export tensorrt --onnx {plans.get('onnx_dir', 'ONNX_DIR')} --out {plan_dir}")
