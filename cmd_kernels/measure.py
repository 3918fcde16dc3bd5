"""Measurement in one home: the environment record every benchmark writes, the ceilings the kernels and
stages are set against (device-copy bandwidth, matmul throughput), GPU kernel timing and the synchronised
wall-clock loop.

It lives in ``cmd_kernels`` because ``cmd_kernels.bench`` may not import ``engine``; ``engine.bench``,
``engine.profile`` and ``benchmarks/`` (``paper_scale``, ``lease_env``, ``cache_quality``) import it from
here. Picture quality (PSNR, SSIM) is ``engine.quality``.
"""

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name`` without importing it; None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# What ``bash benchmarks/gpu_lease.sh --prepare`` records of the checkout: the device machine gets the working
# tree without .git, so this file is where its results find their revision.
LEASE_REVISION = os.path.join(ROOT, ".lease", "revision.json")


def _git_checkout_rev(root: str) -> Optional[Dict[str, Any]]:
    """``{"rev", "dirty"}`` of a git checkout at ``root``; None outside one (or without git)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"rev": rev, "dirty": bool(dirty)}


def write_revision(path: str = LEASE_REVISION, root: str = ROOT) -> Dict[str, Any]:
    """Record the checkout's revision and dirtiness in ``path`` (atomically) for a machine without .git;
    a RuntimeError outside a git checkout. Returns the record."""
    found = _git_checkout_rev(root)
    if found is None:
        raise RuntimeError(f"{root} is not a git checkout: no revision to record")
    record = {**found, "recorded_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)
    return record


def recorded_revision(path: str = LEASE_REVISION) -> Optional[Dict[str, Any]]:
    """The record :func:`write_revision` left, or None (no file, or not a record)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("rev"), str) and record["rev"] else None


def git_rev(root: str = ROOT, recorded: str = LEASE_REVISION) -> Optional[str]:
    """The checkout's commit, with ``+dirty`` when tracked files differed from it: from git where ``root`` is
    a checkout, else from the record ``--prepare`` left in ``.lease/`` (the device machine has no .git);
    None when neither exists."""
    found = _git_checkout_rev(root) or recorded_revision(recorded)
    if found is None:
        return None
    return found["rev"] + ("+dirty" if found.get("dirty") else "")


def device_name(device) -> str:
    """The GPU's name on CUDA, ``"cpu"`` otherwise."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def environment(device="cpu", dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """What a measurement ran on, as every benchmark records it: ``device`` (the GPU's name, or ``"cpu"``),
    ``device_type``, the versions of Python, torch, CUDA, Triton, numpy, diffusers and transformers (None
    where absent), ``git_rev`` (see :func:`git_rev`) and ``utc`` (ISO 8601, seconds); ``gpu`` (its name) on
    CUDA, ``cpu`` (the processor), ``cores`` and ``threads`` (torch's intra-op threads) otherwise; ``dtype``
    when given. Callers add their own keys (a command line, ceilings, load averages)."""
    device = torch.device(device)
    env: Dict[str, Any] = {
        "device": device_name(device), "device_type": device.type, "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": package_version("triton"),
        "numpy": package_version("numpy"), "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"), "git_rev": git_rev(),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if device.type == "cuda":
        env["gpu"] = env["device"]
    else:
        env.update(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                   threads=torch.get_num_threads())
    if dtype is not None:
        env["dtype"] = str(dtype).replace("torch.", "")
    return env


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_times(fn: Callable[[], Any], device, repeats: int, warmup: int = 0) -> Tuple[List[float], List[Any]]:
    """The latency loop: ``warmup`` untimed calls, then ``repeats`` calls each timed on the wall clock between
    two device synchronisations. Returns (seconds of each timed call, what each returned)."""
    for _ in range(warmup):
        fn()
    seconds, results = [], []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        results.append(fn())
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds, results


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call of ``fn`` on the GPU: replays of a CUDA graph holding enough calls
    for ~20 ms (launch overhead removed, as in the engine's CUDA-graph backend); event timing with
    L2 flushes (``triton.testing.do_bench``) where a function cannot be captured."""
    import triton

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    n = max(1, min(500, int(20.0 / max(start.elapsed_time(end) / 5, 1e-3))))
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        times = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / n)
        return statistics.median(times)
    except Exception:  # not capturable: per-call events
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, return_mode="median")


def _seconds(fn: Callable[[], object], device, repeats: int) -> float:
    """Seconds per call: :func:`time_ms` on CUDA, else the best of ``repeats`` wall-clock calls after one."""
    if torch.device(device).type == "cuda":
        return time_ms(fn) / 1e3
    return min(wall_times(fn, device, repeats, warmup=1)[0])


def matmul_tflops(device, dtype: torch.dtype = torch.bfloat16, n: Optional[int] = None, repeats: int = 5) -> float:
    """Measured TFLOP/s (2 n^3 per product) of an n x n by n x n matmul in ``dtype``: the compute ceiling.
    ``n`` defaults to 8192 on CUDA (timed by :func:`time_ms`) and 512 on a CPU (best of ``repeats``)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 512)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = _seconds(lambda: a @ b, device, repeats)
    return 2 * n ** 3 / seconds / 1e12


def copy_gbps(device, nbytes: Optional[int] = None, repeats: int = 5) -> float:
    """Measured GB/s (read + write) of a device copy of ``nbytes`` (default 1 GiB on CUDA, 64 MiB on a CPU):
    the bandwidth ceiling."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = _seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / seconds / 1e9


def ceilings(device) -> Dict[str, float]:
    """The two ceilings, measured now: ``copy_gbps`` (:func:`copy_gbps`) and ``matmul_tflops`` (bf16 on CUDA,
    float32 on a CPU, where they are a dry run's stand-in and say nothing about a GPU)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    out = {"copy_gbps": copy_gbps(device),
           "matmul_tflops": matmul_tflops(device, torch.bfloat16 if cuda else torch.float32)}
    if cuda:
        torch.cuda.empty_cache()
    return out
