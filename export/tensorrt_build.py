"""``python -m export tensorrt``: TensorRT plans from an ONNX export folder.

Per network, one optimisation profile per shape bucket (min/opt/max from the declaration in
:mod:`engine.networks`: the batch spans its range, every other axis is the bucket's). Networks are
**strongly typed** (TensorRT 10.x: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; TensorRT 11 builds
nothing else and removed ``BuilderFlag.FP16/BF16/FP8``): every tensor keeps the type the ONNX graph gives
it, so a plan's precision is its export's (``python -m export onnx --precision float16`` for fp16 plans).
FP8 comes only from FP8 Q/DQ nodes in the graph (e.g. quantised with NVIDIA ModelOpt beforehand).
Supported: TensorRT 10.x and 11.x (:data:`TENSORRT_RANGE`).

Timing cache: one file per TensorRT version and GPU (:func:`timing_cache_path`), since a cache from
another build is refused or, worse, misleads; a cache TensorRT does not accept is replaced by an empty
one (with a warning), and a failure to save it never loses the finished plan.

Plan cache: a plan's file name carries a key hashed from everything that makes it valid - the graph
and weights hashes, the precision, the profiles, the GPU name and compute capability, the TensorRT
version and the builder options (typing included) - so a plan is rebuilt exactly when one of them
changes and reused otherwise. ``plans.json`` maps each network to its current plan for the ``tensorrt``
backend.

Everything up to the plan file works without TensorRT (profiles, keys, the version switch, the
parser-compatibility check of the graphs); building needs it and says so when it is missing.
"""

import hashlib
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

from engine.artefacts import (PLANS_MANIFEST, PRECISIONS as EXPORTABLE, file_hash, gpu_identity,
                              networks_from_manifest, read_manifest, read_plans)
from engine.atomic import output_lock, write_bytes, write_json
from engine.backends.tensorrt import import_tensorrt, tensorrt_major
from engine.networks import Network
from export.trt_compat import check_model

PRECISIONS = ("fp32", "fp16", "bf16")
# The export's precision names (manifest["precision"]) -> the plan precision a strongly typed build gives.
EXPORT_PRECISIONS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
TIMING_CACHE = "timing.cache"  # the stem; the file is keyed by TensorRT version and GPU (timing_cache_path)
DEFAULT_WORKSPACE_GB = 8.0
FP8_TYPES = {17, 18, 19, 20}  # ONNX FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ
TYPING = "strong"  # in every plan key: plans of the old weakly typed builds never match


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


def network_flags(trt) -> int:
    """``create_network`` flags for a strongly typed network: TensorRT 10 needs STRONGLY_TYPED; TensorRT 11
    builds nothing else (the flag is deprecated and ignored there, so none is passed). A ValueError for a
    TensorRT outside the supported range."""
    if tensorrt_major(trt.__version__) == 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def plan_precision(requested: Optional[str], export_precision: str, onnx_dir: str) -> str:
    """The plan precision for graphs exported at ``export_precision``: a strongly typed plan computes in
    the graph's types, so ``requested`` (None: the export's) must match; a one-line ValueError otherwise."""
    if requested is not None and requested not in PRECISIONS:
        raise ValueError(f"unknown TensorRT precision {requested!r}; choose from {', '.join(PRECISIONS)}")
    exported = EXPORT_PRECISIONS.get(export_precision)
    if exported is None:
        raise ValueError(f"{onnx_dir!r} holds {export_precision!r} graphs, which no TensorRT plan precision matches")
    if requested not in (None, exported):
        wanted = next(k for k, v in EXPORT_PRECISIONS.items() if v == requested)
        if wanted not in EXPORTABLE:
            raise ValueError(f"plans are strongly typed (their precision is the graphs'): {requested} plans need "
                             f"{wanted} graphs, and python -m export onnx writes {' and '.join(EXPORTABLE)} only")
        raise ValueError(f"plans are strongly typed (their precision is the graphs'): {onnx_dir!r} holds "
                         f"{export_precision} graphs, so {requested} plans need a {wanted} export "
                         f"(python -m export onnx --precision {wanted}), or drop --precision")
    return exported


def check_precision(precision: str, fp8: bool, compute_capability: str) -> None:
    """A one-line ValueError when the precision is unknown or the GPU lacks it."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown TensorRT precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    cc = tuple(int(v) for v in compute_capability.split("."))
    if precision == "bf16" and cc < (8, 0):
        raise ValueError(f"bf16 needs compute capability 8.0 or newer, this GPU has {compute_capability}")
    if fp8 and cc < (8, 9):
        raise ValueError(f"fp8 needs compute capability 8.9 or newer (Ada, Hopper), this GPU has {compute_capability}")


def graph_has_fp8(onnx_path: str) -> bool:
    """Whether a graph holds FP8 tensors (Q/DQ zero points, casts, initializers): where a strongly typed
    build takes FP8 from. Reads the graph without its external data."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    graph = model.graph
    if any(t.data_type in FP8_TYPES for t in graph.initializer):
        return True
    for node in graph.node:
        for attr in node.attribute:
            if (node.op_type == "Cast" and attr.name == "to" and attr.i in FP8_TYPES) or \
                    (attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in FP8_TYPES):
                return True
    return False


def check_fp8_graphs(onnx_dir: str, manifest: Dict, names: Sequence[str]) -> None:
    """``--fp8`` asks for FP8 kernels, which a strongly typed build takes only from FP8 Q/DQ nodes: a
    one-line ValueError when none of the graphs to build has any."""
    files = [os.path.join(onnx_dir, manifest["networks"][n]["file"]) for n in names]
    if not any(graph_has_fp8(f) for f in files):
        raise ValueError(f"--fp8: the graphs in {onnx_dir!r} hold no FP8 tensors; a strongly typed plan takes FP8 "
                         "only from Q/DQ nodes, so quantise the graphs first (e.g. NVIDIA ModelOpt)")


def check_graphs(onnx_dir: str, names: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """``{network: problems}`` of TensorRT's ONNX parser with the folder's graphs (no TensorRT needed)."""
    manifest = read_manifest(onnx_dir)
    return {name: check_model(os.path.join(onnx_dir, entry["file"]))
            for name, entry in manifest["networks"].items() if not names or name in names}


def timing_cache_path(out_dir: str, tensorrt_version: str, target: Dict[str, str]) -> str:
    """The timing cache file of one TensorRT version on one GPU model: ``OUT/timing-<version>-<gpu>-sm<cc>.cache``
    (a cache holds tactic timings of that build on that GPU; another one's would be refused or mislead)."""
    gpu = "".join(c if c.isalnum() else "-" for c in target["gpu"]).strip("-").lower()
    cc = target["compute_capability"].replace(".", "")
    stem, ext = os.path.splitext(TIMING_CACHE)
    return os.path.join(out_dir, f"{stem}-{tensorrt_version}-{gpu}-sm{cc}{ext}")


def attach_timing_cache(config, path: Optional[str], log: Callable[[str], None] = print):
    """Load ``path`` (if it exists) into ``config`` as its timing cache; a cache TensorRT refuses (another
    version or GPU, a damaged file) is replaced by an empty one, with a warning. Returns the attached cache
    or None when TensorRT took none."""
    data = b""
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):  # False: refuse a mismatched cache
        return cache
    if data:
        log(f"  warning: TensorRT refused the timing cache {path} (built by another TensorRT or GPU, or "
            "damaged): timing from scratch")
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, False):
            return cache
    log("  warning: TensorRT took no timing cache: this build times every tactic")
    return None


def save_timing_cache(config, path: str, log: Callable[[str], None] = print) -> bool:
    """Write the config's timing cache to ``path`` atomically; a failure is a warning, never an error (the
    plan it helped build is already written). Returns whether it was saved."""
    try:
        cache = config.get_timing_cache()
        if cache is None:
            raise RuntimeError("the builder config holds no timing cache")
        write_bytes(path, bytes(cache.serialize()))
        return True
    except Exception as e:  # noqa: BLE001 - the cache only speeds up later builds
        log(f"  warning: timing cache not saved to {path}: {e}")
        return False


def parse_graph(trt, builder, logger, onnx_path: str):
    """A strongly typed network from one ONNX graph (by path: external data is found beside it)."""
    graph = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(graph, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    return graph, parser  # the parser must outlive the build (it owns the weights it parsed)


def add_profiles(builder, config, network: Network) -> None:
    """One optimisation profile per bucket, in the declaration's order."""
    for profile in network.profiles():
        opt = builder.create_optimization_profile()
        for name in network.input_names:
            opt.set_shape(name, profile.min[name], profile.opt[name], profile.max[name])
        config.add_optimization_profile(opt)


def build_plan(onnx_path: str, network: Network, plan_path: str, timing_cache: Optional[str] = None,
               workspace_gb: float = DEFAULT_WORKSPACE_GB, log: Callable[[str], None] = print,
               refit: bool = False) -> None:
    """Parse one graph as a strongly typed network, build its plan with one profile per bucket, write it,
    then save the timing cache (a failure there is a warning: the plan is kept). ``refit``: a refittable plan
    (``BuilderFlag.REFIT``), whose weights adapters then refit with ``trt.Refitter`` instead of a rebuild
    (engine/backends/tensorrt.py). TensorRT 11.3 lists a known issue: a REFIT plan may drop a GEMM bias even
    before any refit; the ``tensorrt``-marked adapter test compares such a plan with eager before and after."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    graph, _parser = parse_graph(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2 ** 30))
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    attach_timing_cache(config, timing_cache, log)
    add_profiles(builder, config, network)
    start = time.perf_counter()
    plan = builder.build_serialized_network(graph, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build a plan for {onnx_path} (see its log above)")
    write_bytes(plan_path, bytes(plan))
    log(f"  built {os.path.basename(plan_path)} in {time.perf_counter() - start:.1f} s")
    if timing_cache:
        save_timing_cache(config, timing_cache, log)


def build_plans(onnx_dir: str, out_dir: str, precision: Optional[str] = None, fp8: bool = False,
                timing_cache: Optional[str] = None, workspace_gb: float = DEFAULT_WORKSPACE_GB,
                names: Optional[Sequence[str]] = None, device=None, force: bool = False,
                log: Callable[[str], None] = print, refit: bool = False) -> Dict:
    """Plans for the graphs of ``onnx_dir`` into ``out_dir`` (reusing those whose key is unchanged);
    returns the written ``plans.json``. ``precision`` (None: the export's) must be the graphs' own, as
    plans are strongly typed; ``fp8`` needs FP8 Q/DQ graphs. ``timing_cache`` defaults to
    :func:`timing_cache_path` in ``out_dir``. Holds the folder's one-writer lock
    (:func:`engine.atomic.output_lock`) while it builds: another build into ``out_dir`` refuses (OutputBusy, a
    ValueError)."""
    manifest = read_manifest(onnx_dir)
    networks = networks_from_manifest(manifest)
    chosen = _chosen_networks(onnx_dir, networks, names)
    precision = plan_precision(precision, manifest["precision"], onnx_dir)
    trt = import_tensorrt()  # say what is missing before any work
    target = gpu_identity(device)
    check_precision(precision, fp8, target["compute_capability"])
    if fp8:
        check_fp8_graphs(onnx_dir, manifest, chosen)
    with output_lock(out_dir, "--out"):  # one builder at a time in a plan folder
        os.makedirs(out_dir, exist_ok=True)
        timing_cache = timing_cache or timing_cache_path(out_dir, trt.__version__, target)
        options = {"fp8": fp8, "workspace_gb": workspace_gb, "typing": TYPING,
                   **({"refit": True} if refit else {})}
        plans = {"onnx_dir": os.path.abspath(onnx_dir), "tensorrt": trt.__version__, "target": target,
                 "precision": precision, "options": options, "weights_sha256": manifest["model"]["weights_sha256"],
                 "onnx_manifest": manifest, "networks": {}}
        old = read_plans(out_dir, missing_ok=True)
        plans["networks"] = _kept_plans(old, plans, chosen)
        for name in chosen:
            entry, profiles = manifest["networks"][name], profiles_for(networks[name])
            key = plan_key(entry["onnx_sha256"], entry["weights_sha256"], precision, profiles, target["gpu"],
                           target["compute_capability"], trt.__version__, options)
            path = os.path.join(out_dir, plan_filename(name, key))
            cached = old.get("networks", {}).get(name, {})
            if (not force and os.path.isfile(path) and cached.get("plan") == os.path.basename(path)
                    and cached.get("plan_sha256") == file_hash(path)):  # a changed or truncated plan is built again
                log(f"{name}: plan cache hit ({os.path.basename(path)})")
            else:
                log(f"{name}: building ({precision}{' + fp8' if fp8 else ''}, strongly typed, "
                    f"{len(profiles)} profile(s))")
                build_plan(os.path.join(onnx_dir, entry["file"]), networks[name], path, timing_cache, workspace_gb,
                           log, refit)
            plans["networks"][name] = {"plan": os.path.basename(path), "plan_sha256": file_hash(path), "key": key,
                                       "profiles": profiles}
        write_json(os.path.join(out_dir, PLANS_MANIFEST), plans)
    return plans


def _chosen_networks(onnx_dir: str, networks: Dict[str, Network], names: Optional[Sequence[str]]) -> List[str]:
    """The networks to build, in the manifest's order; a one-line ValueError for a name it lacks."""
    if names:
        unknown = [n for n in names if n not in networks]
        if unknown:
            raise ValueError(f"{onnx_dir!r} has no {unknown[0]} graph; it has {', '.join(networks)}")
    return [n for n in networks if not names or n in names]


def _kept_plans(old: Dict, plans: Dict, chosen: Sequence[str]) -> Dict:
    """The entries of an earlier ``plans.json`` for networks not built now, kept when it was the same build."""
    same_build = all(old.get(k) == plans[k] for k in ("tensorrt", "target", "precision", "options", "weights_sha256"))
    if not same_build:
        return {}
    return {n: e for n, e in old.get("networks", {}).items() if n not in chosen and n in plans["onnx_manifest"]["networks"]}
