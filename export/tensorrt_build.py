"""``python -m export tensorrt``: TensorRT plans from an ONNX export folder.

Per network, one optimisation profile per shape bucket (min/opt/max from the declaration in
:mod:`engine.networks`: the batch spans its range, every other axis is the bucket's), the precision
as builder flags (fp16 or bf16 on top of fp32; fp8 on top of those where the GPU has it: FP8 kernels
are chosen only for Q/DQ-quantised layers, which this export does not insert, so fp8 needs graphs
quantised beforehand, e.g. with NVIDIA ModelOpt), one timing cache shared across builds.

Plan cache: a plan's file name carries a key hashed from everything that makes it valid - the graph
and weights hashes, the precision, the profiles, the GPU name and compute capability, the TensorRT
version and the builder options - so a plan is rebuilt exactly when one of them changes and reused
otherwise. ``plans.json`` maps each network to its current plan for the ``tensorrt`` backend.

Everything up to the plan file works without TensorRT (profiles, keys, the parser-compatibility
check of the graphs); building needs it and says so when it is missing.
"""

import hashlib
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

from engine.artefacts import PLANS_MANIFEST, gpu_identity, networks_from_manifest, read_manifest, read_plans
from engine.backends.tensorrt import import_tensorrt
from engine.networks import Network
from engine.atomic import write_bytes, write_json
from export.trt_compat import check_model

PRECISIONS = ("fp32", "fp16", "bf16")
TIMING_CACHE = "timing.cache"
DEFAULT_WORKSPACE_GB = 8.0


def profiles_for(network: Network) -> List[Dict]:
    """The optimisation profiles of a network as data (one per bucket), in the order the plan holds them."""
    return [p.to_dict() for p in network.profiles()]


def plan_key(onnx_sha256: str, weights_sha256: str, precision: str, profiles: List[Dict], gpu: str,
             compute_capability: str, tensorrt_version: str, options: Optional[Dict] = None) -> str:
    """sha256 of everything a plan depends on; any change gives another key (and another plan file)."""
    payload = {"onnx": onnx_sha256, "weights": weights_sha256, "precision": precision, "profiles": profiles,
               "gpu": gpu, "compute_capability": compute_capability, "tensorrt": tensorrt_version,
               "options": options or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_filename(network: str, key: str) -> str:
    return f"{network}-{key[:16]}.plan"


def check_precision(precision: str, fp8: bool, compute_capability: str) -> None:
    """A one-line ValueError when the precision is unknown or the GPU lacks it."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown TensorRT precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    cc = tuple(int(v) for v in compute_capability.split("."))
    if precision == "bf16" and cc < (8, 0):
        raise ValueError(f"bf16 needs compute capability 8.0 or newer, this GPU has {compute_capability}")
    if fp8 and cc < (8, 9):
        raise ValueError(f"fp8 needs compute capability 8.9 or newer (Ada, Hopper), this GPU has {compute_capability}")


def check_graphs(onnx_dir: str, names: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """``{network: problems}`` of TensorRT's ONNX parser with the folder's graphs (no TensorRT needed)."""
    manifest = read_manifest(onnx_dir)
    return {name: check_model(os.path.join(onnx_dir, entry["file"]))
            for name, entry in manifest["networks"].items() if not names or name in names}


def build_plan(onnx_path: str, network: Network, plan_path: str, precision: str = "fp16", fp8: bool = False,
               timing_cache: Optional[str] = None, workspace_gb: float = DEFAULT_WORKSPACE_GB,
               log: Callable[[str], None] = print, refit: bool = False) -> None:
    """Parse one graph, build its plan with one profile per bucket, write it (and the timing cache).
    ``refit``: a refittable plan (``BuilderFlag.REFIT``): adapters then refit its weights with ``trt.Refitter``
    instead of a rebuild (engine/backends/tensorrt.py)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    graph = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(graph, logger)
    if not parser.parse_from_file(onnx_path):  # by path: external data is found beside the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2 ** 30))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if fp8:
        config.set_flag(trt.BuilderFlag.FP8)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache_bytes = b""
    if timing_cache and os.path.isfile(timing_cache):
        with open(timing_cache, "rb") as f:
            cache_bytes = f.read()
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)  # refuse a foreign cache
    for profile in network.profiles():
        opt = builder.create_optimization_profile()
        for name in network.input_names:
            opt.set_shape(name, profile.min[name], profile.opt[name], profile.max[name])
        config.add_optimization_profile(opt)
    start = time.perf_counter()
    plan = builder.build_serialized_network(graph, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build a plan for {onnx_path} (see its log above)")
    write_bytes(plan_path, bytes(plan))
    if timing_cache:
        write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    log(f"  built {os.path.basename(plan_path)} in {time.perf_counter() - start:.1f} s")


def build_plans(onnx_dir: str, out_dir: str, precision: str = "fp16", fp8: bool = False,
                timing_cache: Optional[str] = None, workspace_gb: float = DEFAULT_WORKSPACE_GB,
                names: Optional[Sequence[str]] = None, device=None, force: bool = False,
                log: Callable[[str], None] = print, refit: bool = False) -> Dict:
    """Plans for the graphs of ``onnx_dir`` into ``out_dir`` (reusing those whose key is unchanged);
    returns the written ``plans.json``."""
    manifest = read_manifest(onnx_dir)
    networks = networks_from_manifest(manifest)
    if names:
        unknown = [n for n in names if n not in networks]
        if unknown:
            raise ValueError(f"{onnx_dir!r} has no {unknown[0]} graph; it has {', '.join(networks)}")
    trt = import_tensorrt()  # say what is missing before any work
    target = gpu_identity(device)
    check_precision(precision, fp8, target["compute_capability"])
    os.makedirs(out_dir, exist_ok=True)
    timing_cache = timing_cache or os.path.join(out_dir, TIMING_CACHE)
    options = {"fp8": fp8, "workspace_gb": workspace_gb, **({"refit": True} if refit else {})}
    plans = {"onnx_dir": os.path.abspath(onnx_dir), "tensorrt": trt.__version__, "target": target,
             "precision": precision, "options": options, "weights_sha256": manifest["model"]["weights_sha256"],
             "onnx_manifest": manifest, "networks": {}}
    old = read_plans(out_dir, missing_ok=True)
    same_build = all(old.get(k) == plans[k] for k in ("tensorrt", "target", "precision", "options", "weights_sha256"))
    for name, network in networks.items():
        if names and name not in names:
            if same_build and name in old.get("networks", {}):  # keep plans of the same build
                plans["networks"][name] = old["networks"][name]
            continue
        entry = manifest["networks"][name]
        profiles = profiles_for(network)
        key = plan_key(entry["onnx_sha256"], entry["weights_sha256"], precision, profiles, target["gpu"],
                       target["compute_capability"], trt.__version__, options)
        path = os.path.join(out_dir, plan_filename(name, key))
        if os.path.isfile(path) and not force:
            log(f"{name}: plan cache hit ({os.path.basename(path)})")
        else:
            log(f"{name}: building ({precision}{' + fp8' if fp8 else ''}, {len(profiles)} profile(s))")
            build_plan(os.path.join(onnx_dir, entry["file"]), network, path, precision, fp8, timing_cache,
                       workspace_gb, log, refit)
        plans["networks"][name] = {"plan": os.path.basename(path), "key": key, "profiles": profiles}
    write_json(os.path.join(out_dir, PLANS_MANIFEST), plans)
    return plans

