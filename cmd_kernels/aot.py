"""Ahead-of-time compile check and Triton cache fill, without a GPU:

    python -m cmd_kernels.aot [--arch 80,90] [--config NAME ...] [--dtype DTYPE ...] [--autotune off|fast|full]
                          [--quick] [--json FILE] [--jobs N] [--fill-cache DIR [--triton-key-from WHEEL]]
    python -m cmd_kernels.aot --use-cache DIR

Compiles every Triton kernel of ``cmd_kernels`` at every launch config that its launcher and autotuner can
pick at each config's shapes (the three shipped configs by default), for each target (sm_80 = A100,
sm_90 = H100/H200), and reports per row: kernel, shape class, launch config, dtype, arch, registers,
spill bytes, shared memory, tensor-core MMA (``wgmma`` / ``mma.sync`` in the PTX, HGMMA / HMMA in the SASS
from the ``cuobjdump`` that the Triton wheel carries), and the width of the global loads in the main loop
(128-bit ``ld.global`` or 16-byte ``cp.async``). Only torch (for dtypes and meta tensors) and triton (its
bundled ptxas and cuobjdump) are needed; no CUDA driver.

How: the launchers build their launches (``cmd_kernels._triton.Launch``) from meta tensors laid out as the
engine lays out the real ones (q, k, v are views of one (B, N, 3, heads, d) projection; shift and scale
are chunks of the (B, 6C) adaLN vector), the kernel's ``TunedKernel.candidates`` lists the configs a
launch may compile on that target (after pruning what cannot fit), and each is compiled through the JIT's
own path (``warmup``: binder, specialisation, heuristics, options, cache key, ``triton.compile``) with a
stand-in driver that reports the target. So the compiles, and their cache keys, are the ones a GPU
process makes for the same launches: ``--fill-cache DIR`` exports them as a Triton cache that a GPU
machine reuses with ``TRITON_CACHE_DIR=DIR`` (after ``--use-cache DIR`` there), so that none of our
kernels compiles there. tests/cmd_kernels/test_aot.py checks the key equality against the JIT's launch path.

Shapes: each config's kernel shapes come from its JSON file, read as data by ``cmd_kernels.bench.config_shapes``
(autoencoder ops at the stage-1 training batch, DiT ops at batch 2, one video with classifier-free
guidance): this package may not import ``engine``. Triton specialises a launch on its integer arguments
only by divisibility by 16 and equality to 1, so these shapes also stand for other batch sizes of a
config (batch 1 at inference gives the same binaries when frames, heights and widths keep their
factors of 16).

Exit status 1 when a kernel does not compile, an inference (forward) config spills registers, a config
kept by the pruning needs more shared memory than the target has, or the bf16/fp16 attention lacks its
tensor-core MMA or, where its strides allow 16-byte alignment, its 128-bit loads and cp.async pipeline.
Exit status 2 on bad arguments.
"""

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton

from cmd_kernels._triton import AUTOTUNE_MODES, INTERPRETED, KNOWN_TARGETS, Launch, Target, TunedKernel, config_key

ARCHS = (80, 90)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The dtypes compiled by default: bf16 everywhere (the GPU engine's dtype); the attention also in fp16
# (tensor cores, like bf16) and fp32 (IEEE dots: the tests' and cmd_kernels.bench's correctness dtype).
DEFAULT_DTYPES = {"motion_attention_fwd": ("bfloat16", "float16", "float32")}
MANIFEST = "cmd-aot-manifest.json"


# ------------------------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Case:
    """One launch site at one shape class: ``build(dtype, target)`` returns the launcher's ``Launch`` on meta
    tensors laid out as the engine lays out the real ones."""
    kernel: str  # e.g. "motion_attention_fwd"
    config: str  # the config the shapes come from
    shape: str  # the shape class, e.g. "B2 h16 N512 d72"
    inference: bool  # runs when generating (forward kernels); backward kernels train
    build: Callable[[torch.dtype, Target], Launch]


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def cases(config: str) -> List[Case]:
    """The launch sites of every kernel at the shapes of ``config`` (a name in engine/configs or a JSON
    path). Raises ``ValueError`` for an unknown config."""
    from cmd_kernels.bench import config_shapes
    from cmd_kernels.ops import content_frame as cf, decoder_fusion as fu, modulated_layernorm as ln, motion_attention as at

    s = config_shapes(config)
    name = s.config
    b, l, c, h, w = s.content_frame
    db, heads, n, d = s.attention
    mb, mn, mc = s.modulated_layernorm
    fb, fl, fh, fw, fc = s.decoder_fusion

    def frames(dtype):  # frames and logits (B, L, C, H, W): the video and unpatchify's output, dense
        return _meta(b, l, c, h, w, dtype=dtype), _meta(b, l, c, h, w, dtype=dtype)

    def qkv(dtype):  # the DiT's qkv projection (B, N, 3, heads, d) seen as three (B, heads, N, d) views
        return _meta(db, n, 3, heads, d, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)

    def modln(dtype):  # x (B, N, C); shift, scale: chunks of the (B, 6C) adaLN modulation
        mod = _meta(mb, 6 * mc, dtype=dtype)
        return _meta(mb, mn, mc, dtype=dtype), mod[:, :mc], mod[:, mc:2 * mc]

    def planes(dtype):  # content (B, H', W', C'), time-height (B, L, H', C'), time-width (B, L, W', C'), w, b
        return (_meta(fb, fh, fw, fc, dtype=dtype), _meta(fb, fl, fh, fc, dtype=dtype),
                _meta(fb, fl, fw, fc, dtype=dtype), _meta(fc, dtype=dtype), _meta(fc, dtype=dtype))

    cf_shape = f"B{b} L{l} C{c} H{h} W{w}"
    at_shape = f"B{db} h{heads} N{n} d{d}"
    ln_shape = f"B{mb} N{mn} C{mc}"
    fu_shape = f"B{fb} L{fl} H'{fh} W'{fw} C'{fc}"
    return [
        Case("content_frame_fwd", name, cf_shape, True, lambda dt, t: cf._forward_launch(*frames(dt))[0]),
        Case("content_frame_bwd", name, cf_shape, False,
             lambda dt, t: cf._backward_launch(_meta(b, c, h, w, dtype=dt), *frames(dt))[0]),
        Case("motion_attention_fwd", name, at_shape, True,
             lambda dt, t: at._forward_launch(*qkv(dt), d ** -0.5)[0]),
        Case("modulated_layernorm_fwd", name, ln_shape, True,
             lambda dt, t: ln._forward_launch(*modln(dt), 1e-6)[0]),
        Case("modulated_layernorm_bwd", name, ln_shape, False,
             lambda dt, t: ln._backward_launch(_meta(mb, mn, mc, dtype=dt), *modln(dt), 1e-6,
                                                  num_sms=t.num_sms)[0]),
        Case("decoder_fusion_fwd", name, fu_shape, True, lambda dt, t: fu._forward_launch(*planes(dt), 1e-5)[0]),
        Case("decoder_fusion_bwd", name, fu_shape, False,
             lambda dt, t: fu._backward_launch(_meta(fb, fl, fh, fw, fc, dtype=dt), _meta(fb, fl, fh, fw, fc, dtype=dt),
                                               *planes(dt), 1e-5)[0]),
    ]


KERNELS = ("content_frame_fwd", "content_frame_bwd", "motion_attention_fwd", "modulated_layernorm_fwd",
           "modulated_layernorm_bwd", "decoder_fusion_fwd", "decoder_fusion_bwd")


def named_args(launch: Launch) -> Dict[str, object]:
    """A launch's arguments by parameter name (positional and keyword)."""
    fn = launch.kernel.fn if isinstance(launch.kernel, TunedKernel) else launch.kernel
    return dict(zip(fn.arg_names, launch.args), **launch.kwargs)


def launch_configs(launch: Launch, mode: str, target: Target, unpruned: bool = False
                   ) -> List[Tuple[Optional[triton.Config], bool]]:
    """(config, kept by the pruning) for every config a launch may compile on ``target`` in ``mode``:
    the kernel's candidates, or ``[(None, True)]`` for a launch with a fixed config. ``unpruned``: every
    config of the mode's space, pruned or not (to check the fit estimates)."""
    kernel = launch.kernel
    if not isinstance(kernel, TunedKernel):
        return [(None, True)]
    args = named_args(launch)
    kept = {config_key(c) for c in kernel.candidates(args, mode, target)}
    space = kernel.space(args, mode) if unpruned else kernel.candidates(args, mode, target)
    return [(c, config_key(c) in kept) for c in space]


# ------------------------------------------------------------------------------------ compilation

class TargetDriver:
    """Stands in for Triton's CUDA driver while compiling: reports ``target`` as the current device's
    target (device id = arch, so each target keeps its own JIT caches), stream 0. Only compilation runs
    under it (``warmup``); a launch would need the real driver."""

    def __init__(self, target: Target):
        from triton.backends.compiler import GPUTarget
        self.arch = target.arch
        self.gpu_target = GPUTarget("cuda", target.arch, 32)

    def is_active(self):
        return True

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.gpu_target


@contextlib.contextmanager
def target_driver(target: Target) -> Iterator[None]:
    from triton.runtime.driver import driver
    previous = getattr(driver, "_active", None)  # None: the CUDA driver, made on first use (not here)
    driver.set_active(TargetDriver(target))
    try:
        yield
    finally:
        driver.set_active(previous)


def compile_launch(launch: Launch, config: Optional[triton.Config], target: Target):
    """Compile ``launch`` with ``config`` for ``target`` through the JIT's warmup path (heuristics, binder,
    cache key, compile) -> (CompiledKernel, ptxas -v log or "" on a cache hit, seconds)."""
    from triton import knobs

    fn = launch.kernel.fn if isinstance(launch.kernel, TunedKernel) else launch.kernel
    kwargs = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    knobs.nvidia.dump_ptxas_log = True  # printed by the compile; not part of the cache key
    out = io.StringIO()
    start = time.perf_counter()
    with target_driver(target), contextlib.redirect_stdout(out):
        compiled = fn.warmup(*launch.args, grid=(1,), **kwargs)
    return compiled, out.getvalue(), time.perf_counter() - start


def heuristic_values(launch: Launch, config: Optional[triton.Config]) -> Dict[str, object]:
    """The ``triton.heuristics`` values a launch gets (e.g. the attention's ALIGN), as at run time."""
    from triton.runtime.autotuner import Heuristics

    fn = launch.kernel.fn if isinstance(launch.kernel, TunedKernel) else launch.kernel
    meta = dict(launch.kwargs, **(config.all_kwargs() if config is not None else {}))
    values = {}
    while hasattr(fn, "fn"):
        if isinstance(fn, Heuristics):
            for name, rule in fn.values.items():
                values[name] = meta[name] = rule({**dict(zip(fn.arg_names, launch.args)), **meta})
        fn = fn.fn
    return values


# ---------------------------------------------------------------------------------- code features

def _tool(name: str) -> Optional[str]:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return here if os.path.exists(here) else shutil.which(name)


def ptxas_info(log: str) -> Dict[str, Optional[int]]:
    """Registers per thread, stack frame and spill bytes from a ``ptxas -v`` log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"regs": int(regs.group(1)) if regs else None,
            "stack": int(spill.group(1)) if spill else None,
            "spill_stores": int(spill.group(2)) if spill else None,
            "spill_loads": int(spill.group(3)) if spill else None}


_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_LD_GLOBAL = re.compile(r"\bld\.global((?:\.[\w:]+)+)\s")
_ST_GLOBAL = re.compile(r"\bst\.global((?:\.[\w:]+)+)\s")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def _width(modifiers: str) -> int:
    """Bits moved by one ld/st.global with these modifiers (e.g. ``.v4.b32`` -> 128)."""
    vec, bits = 1, 0
    for part in modifiers.split("."):
        if re.fullmatch(r"v[248]", part):
            vec = int(part[1:])
        elif re.fullmatch(r"[bfus]\d+", part):
            bits = int(part[1:])
    return vec * bits


def _count(widths: List[int]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for w in sorted(widths, reverse=True):
        out[str(w)] = out.get(str(w), 0) + 1
    return out


def ptx_features(ptx: str) -> Dict[str, object]:
    """Tensor-core MMA, and global loads by width (bits) inside loops (between a label and a backward
    branch to it: the main loop; prologue copies of a pipeline sit outside) and in the whole kernel;
    ``cp.async`` copies by size (bytes)."""
    lines = ptx.splitlines()
    labels = {}
    in_loop = [False] * len(lines)
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and b.group(1) in labels:  # a backward branch closes a loop
            for j in range(labels[b.group(1)], i + 1):
                in_loop[j] = True
    ld_all, ld_loop, cp_all, cp_loop, st_all = [], [], [], [], []
    for i, line in enumerate(lines):
        for m in _LD_GLOBAL.finditer(line):
            ld_all.append(_width(m.group(1)))
            if in_loop[i]:
                ld_loop.append(_width(m.group(1)))
        for m in _CP_ASYNC.finditer(line):
            cp_all.append(int(m.group(1), 0))
            if in_loop[i]:
                cp_loop.append(int(m.group(1), 0))
        for m in _ST_GLOBAL.finditer(line):
            st_all.append(_width(m.group(1)))
    wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    mma_sync = len(re.findall(r"\bmma\.sync\.aligned", ptx))
    return {
        "mma": "wgmma" if wgmma else "mma.sync" if mma_sync else None,
        "ptx_wgmma": wgmma, "ptx_mma_sync": mma_sync,
        "loop_loads": _count(ld_loop), "loop_cp_async": _count(cp_loop),
        "loads": _count(ld_all), "cp_async": _count(cp_all), "stores": _count(st_all),
        "vec128_loop": bool(ld_loop and max(ld_loop) >= 128) or bool(cp_loop and max(cp_loop) >= 16),
    }


_SASS = {"HMMA": r"\bHMMA\.", "HGMMA": r"\bHGMMA\.", "LDGSTS": r"\bLDGSTS\b", "LDGSTS_128": r"\bLDGSTS(?:\.\w+)*\.128\b",
         "LDG_128": r"\bLDG(?:\.\w+)*\.128\b", "STG_128": r"\bSTG(?:\.\w+)*\.128\b", "LDL": r"\bLDL\b",
         "STL": r"\bSTL\b"}


def sass_features(cubin: bytes) -> Optional[Dict[str, int]]:
    """Instruction counts from ``cuobjdump -sass`` (tensor cores, cp.async, 128-bit loads, local memory);
    None when no cuobjdump is found."""
    cuobjdump = _tool("cuobjdump")
    if not cuobjdump:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
    return {k: len(re.findall(pattern, sass)) for k, pattern in _SASS.items()}


# ----------------------------------------------------------------------------------------- rows

@dataclasses.dataclass(frozen=True)
class Task:
    """One compile: case ``index`` of ``config``'s cases, in ``dtype``, for ``arch``, config number
    ``config_index`` of the launch's configs (see ``launch_configs``)."""
    config: str
    index: int
    dtype: str
    arch: int
    mode: str
    unpruned: bool
    config_index: int


def tasks(configs: Sequence[str], archs: Sequence[int], dtypes: Optional[Sequence[str]], mode: str,
          unpruned: bool = False, kernels: Optional[Sequence[str]] = None) -> List[Task]:
    """Every compile of a run (configs x kernels x dtypes x archs x launch configs)."""
    out = []
    for config in configs:
        for index, case in enumerate(cases(config)):
            if kernels and case.kernel not in kernels:
                continue
            for dname in dtypes or DEFAULT_DTYPES.get(case.kernel, ("bfloat16",)):
                for arch in archs:
                    launch = case.build(DTYPES[dname], KNOWN_TARGETS[arch])
                    n = len(launch_configs(launch, mode, KNOWN_TARGETS[arch], unpruned))
                    out += [Task(config, index, dname, arch, mode, unpruned, k) for k in range(n)]
    return out


_CASES: Dict[str, List[Case]] = {}


def _case(task: Task) -> Case:
    if task.config not in _CASES:
        _CASES[task.config] = cases(task.config)
    return _CASES[task.config][task.index]


def run_task(task: Task) -> dict:
    """Compile one task and describe it (a JSON-able row; ``ok`` False with ``error`` when it failed)."""
    case = _case(task)
    target = KNOWN_TARGETS[task.arch]
    launch = case.build(DTYPES[task.dtype], target)
    config, kept = launch_configs(launch, task.mode, target, task.unpruned)[task.config_index]
    launch_cfg = dict(config.kwargs) if config is not None else {
        k: v for k, v in launch.kwargs.items() if k.startswith("BLOCK") or k == "num_warps"}
    if config is not None:
        launch_cfg.update(num_warps=config.num_warps, num_stages=config.num_stages)
    row = {"kernel": case.kernel, "config": case.config, "shape": case.shape, "dtype": task.dtype,
           "arch": task.arch, "launch": launch_cfg, "inference": case.inference, "kept": kept}
    try:
        row["heuristics"] = heuristic_values(launch, config)
        compiled, log, seconds = compile_launch(launch, config, target)
        md = compiled.metadata
        row.update(ok=True, seconds=round(seconds, 2), hash=compiled.hash, num_warps=md.num_warps,
                   num_stages=md.num_stages, shared=md.shared, shared_limit=target.max_shared_mem,
                   **ptxas_info(log), **ptx_features(compiled.asm.get("ptx", "")),
                   sass=sass_features(compiled.asm["cubin"]) if "cubin" in compiled.asm else None)
    except Exception as e:  # noqa: BLE001 - a failed compile is a result of the check
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
    return row


def _share_ptxas_info(rows: List[dict]) -> None:
    """A compile that hit the cache (the same binary as another row: another shape class or worker)
    printed no ptxas log: take registers and spills from the row that compiled it."""
    by_hash = {r["hash"]: r for r in rows if r.get("ok") and r.get("regs") is not None}
    for r in rows:
        if r.get("ok") and r.get("regs") is None and r["hash"] in by_hash:
            for k in ("regs", "stack", "spill_stores", "spill_loads"):
                r[k] = by_hash[r["hash"]][k]


def problems(row: dict) -> List[str]:
    """Why a row fails the check (empty: it passes)."""
    if not row.get("ok"):
        return [f"does not compile: {row.get('error')}"]
    out = []
    spilled = (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0)
    if row["inference"] and spilled:
        out.append(f"spills {spilled} bytes")
    if row["kept"] and row["shared"] > row["shared_limit"]:
        out.append(f"needs {row['shared']} B of shared memory, over the {row['shared_limit']} B of sm_{row['arch']}")
    if row["kernel"] == "motion_attention_fwd" and row["dtype"] in ("bfloat16", "float16"):
        if not row["mma"]:
            out.append("no tensor-core MMA")
        if row["heuristics"].get("ALIGN", 1) > 1:
            if not row["vec128_loop"]:
                out.append("no 128-bit loads in the main loop")
            if not row["cp_async"]:
                out.append("no cp.async pipeline")
    return out


# ------------------------------------------------------------------------------------- the cache

def _record_hashes(lines: Sequence[str]) -> Dict[str, str]:
    """path -> sha256 hex digest from a wheel RECORD."""
    out = {}
    for line in lines:
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1].startswith("sha256="):
            out[parts[0]] = base64.urlsafe_b64decode(parts[1][len("sha256="):] + "==").hex()
    return out


def triton_key_from_wheel(wheel: str) -> str:
    """The ``triton_key()`` that the Triton of ``wheel`` (another build of the installed version, e.g. the
    cp312 wheel of a GPU machine running Python 3.12) computes. The key hashes Triton's Python sources and
    the bytes of ``_C/libtriton.so``, which differ between the cp311 and cp312 builds; the compiled code
    does not. Checks that every file of the wheel but its shared libraries equals the installed one (so
    both compile alike) and returns the installed key with the libtriton digest replaced by the
    wheel's. Raises ``ValueError`` naming the mismatch."""
    from triton.runtime.cache import triton_key

    try:
        with zipfile.ZipFile(wheel) as z:
            record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
            wheel_hashes = _record_hashes(z.read(record).decode().splitlines())
            version = re.search(r"^Version: (\S+)$", z.read(record.replace("RECORD", "METADATA")).decode(), re.M)
    except (OSError, zipfile.BadZipFile, StopIteration) as e:
        raise ValueError(f"--triton-key-from: {wheel!r} is not a readable Triton wheel ({e})") from e
    if not version or version.group(1) != triton.__version__:
        raise ValueError(f"--triton-key-from: {wheel!r} is Triton {version.group(1) if version else '?'}, "
                         f"this process runs Triton {triton.__version__}: install the same version here")
    root = os.path.dirname(os.path.dirname(triton.__file__))
    for path, digest in wheel_hashes.items():
        if not path.startswith("triton/") or path.endswith(".so"):
            continue
        with open(os.path.join(root, path), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise ValueError(f"--triton-key-from: {path} differs between {os.path.basename(wheel)} and "
                                 f"the installed Triton: the key would not describe the same compiler")
    lib = os.path.join(os.path.dirname(triton.__file__), "_C", "libtriton.so")
    with open(lib, "rb") as f:
        here = hashlib.sha256(f.read()).hexdigest()
    key = triton_key()
    if key.count(here) != 1 or "triton/_C/libtriton.so" not in wheel_hashes:
        raise ValueError("--triton-key-from: this Triton's cache key is not laid out as expected "
                         "(version + source hashes + libtriton hash); run the fill under the target Python instead")
    return key.replace(here, wheel_hashes["triton/_C/libtriton.so"])


def use_triton_key(key: str) -> None:
    """Make this process's Triton compute cache keys with ``key`` as its ``triton_key()``."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.cache as cache

    cache.triton_key = autotuner.triton_key = lambda: key


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def backend_hash(arch: int) -> str:
    """The compiler backend's part of every cache key for ``arch``: the ptxas version (Triton's bundled
    ptxas unless ``TRITON_PTXAS_PATH`` / ``TRITON_PTXAS_BLACKWELL_PATH`` names another) and the arch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    return make_backend(GPUTarget("cuda", arch, 32)).hash()


def export_cache(rows: List[dict], src: str, dest: str) -> int:
    """Copy the compiled kernels of ``rows`` from Triton cache ``src`` into ``dest`` as a Triton cache that
    holds what a launch needs (the binary and its metadata, as ``TRITON_STORE_BINARY_ONLY`` stores them).
    Returns the number of kernels. Each index file (``__grp__*.json``) names absolute paths: ``--use-cache``
    points them at the cache's folder on the machine that uses it."""
    done = set()
    for r in rows:
        if not r.get("ok") or r["hash"] in done:
            continue
        done.add(r["hash"])
        entry = base64.b32encode(bytes.fromhex(r["hash"])).decode().rstrip("=")
        files = os.listdir(os.path.join(src, entry))
        group = next(f for f in files if f.startswith("__grp__"))
        with open(os.path.join(src, entry, group)) as f:
            children = json.load(f)["child_paths"]
        keep = [c for c in children if c.endswith((".json", ".cubin"))]
        os.makedirs(os.path.join(dest, entry), exist_ok=True)
        for c in keep:
            shutil.copyfile(os.path.join(src, entry, c), os.path.join(dest, entry, c))
        with open(os.path.join(dest, entry, group), "w") as f:
            json.dump({"child_paths": {c: os.path.join(os.path.abspath(dest), entry, c) for c in keep}}, f)
    return len(done)


def relocate_cache(cache_dir: str) -> int:
    """Point every index file of the Triton cache ``cache_dir`` at the files beside it (Triton stores
    absolute paths: a cache moved to another folder or machine misses until this is done). Returns the
    number of index files rewritten."""
    cache_dir = os.path.abspath(cache_dir)
    n = 0
    for entry in sorted(os.listdir(cache_dir)):
        folder = os.path.join(cache_dir, entry)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if not name.startswith("__grp__"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                data = json.load(f)
            children = data.get("child_paths")
            if not isinstance(children, dict):
                continue
            data["child_paths"] = {c: os.path.join(folder, os.path.basename(p)) for c, p in children.items()}
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
            n += 1
    return n


def use_cache(cache_dir: str) -> Tuple[bool, str]:
    """Prepare a filled cache for use here: relocate it, and compare its manifest with this machine's
    Triton (version, cache key) and GPU (arch, where CUDA is available). Returns (usable, message)."""
    from triton.runtime.cache import triton_key

    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return False, f"{cache_dir} has no {MANIFEST}: not a cache filled by python -m cmd_kernels.aot --fill-cache"
    with open(path) as f:
        manifest = json.load(f)
    n = relocate_cache(cache_dir)
    notes = []
    if manifest["triton"] != triton.__version__:
        notes.append(f"filled for Triton {manifest['triton']}, this is Triton {triton.__version__}")
    elif manifest["triton_key_sha256"] != _key_digest(triton_key()):
        notes.append(f"filled for another build of Triton {triton.__version__} (key {manifest['triton_key_sha256'][:12]}, "
                     f"this one {_key_digest(triton_key())[:12]}): fill it again with --triton-key-from this "
                     f"machine's wheel, or here with --fill-cache DIR --jobs N")
    for arch, filled in manifest["backend"].items():
        if backend_hash(int(arch)) != filled:
            notes.append(f"filled with another ptxas for sm_{arch} ({filled}, here {backend_hash(int(arch))})")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if 10 * major + minor not in manifest["archs"]:
            notes.append(f"filled for sm_{manifest['archs']}, this GPU is sm_{10 * major + minor}")
    if notes:
        return False, f"{cache_dir}: " + "; ".join(notes)
    return True, (f"{cache_dir}: {manifest['kernels']} kernels for Triton {manifest['triton']} "
                  f"sm_{','.join(map(str, manifest['archs']))} ({manifest['autotune']} configs of "
                  f"{', '.join(manifest['configs'])}), {n} index files pointed here; key matches this Triton")


# ------------------------------------------------------------------------------------------ CLI

def _init_worker(cache_dir: str, key: Optional[str]) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    if key is not None:
        use_triton_key(key)


def _cost_rank(task: Task) -> int:
    """Compile-time rank (measured: fp32 attention and the backward kernels take longest), so that the
    workers of --jobs finish together."""
    kernel = _case(task).kernel
    if kernel == "motion_attention_fwd" and task.dtype == "float32":
        return 0
    return 1 if kernel.endswith("_bwd") else 2


def _print_row(r: dict) -> None:
    cfg = " ".join(f"{k}={v}" for k, v in r["launch"].items())
    head = f"sm_{r['arch']} {r['dtype']:8s} {r['kernel']:24s} {r['config']:14s} {r['shape']:26s} {cfg}"
    if not r["ok"]:
        print(f"{head} | FAILED {r['error']}", flush=True)
        return
    sass = r.get("sass") or {}
    loads = ",".join(f"{w}b x{n}" for w, n in r["loop_loads"].items()) or "-"
    cp = ",".join(f"{b}B x{n}" for b, n in r["loop_cp_async"].items()) or "-"
    regs = (f"regs {r['regs']} spill {r['spill_stores']}/{r['spill_loads']}" if r["regs"] is not None
            else "regs/spills: same binary as another row")
    print(f"{head} | {regs} smem {r['shared']} "
          f"mma {r['mma'] or '-'} (HMMA {sass.get('HMMA')} HGMMA {sass.get('HGMMA')}) loop ld {loads} cp.async {cp}"
          f"{'' if r['kept'] else ' [pruned]'} {r['seconds']}s", flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cmd_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (80, 90)")
    parser.add_argument("--config", nargs="+", default=None,
                        help="config names (engine/configs) or JSON files (default: default ucf101-64 sd21-512x1024)")
    parser.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                        help="dtypes for every kernel (default: bfloat16; attention also float16 and float32)")
    parser.add_argument("--kernel", nargs="+", default=None, choices=KERNELS, help="only these kernels")
    parser.add_argument("--autotune", default="full", choices=AUTOTUNE_MODES,
                        help="the CMD_AUTOTUNE mode whose configs to compile (full holds the others)")
    parser.add_argument("--quick", action="store_true",
                        help="one config per kernel, shape class and arch: the CMD_AUTOTUNE=off one (a CI check)")
    parser.add_argument("--unpruned", action="store_true",
                        help="also compile the configs the fit estimates prune (to check the estimates)")
    parser.add_argument("--json", default=None, help="write every row and the summary here")
    parser.add_argument("--jobs", type=int, default=1, help="compile in N processes")
    parser.add_argument("--fill-cache", default=None, metavar="DIR",
                        help="export the compiled kernels into DIR, a Triton cache for TRITON_CACHE_DIR")
    parser.add_argument("--triton-key-from", default=None, metavar="WHEEL",
                        help="compute cache keys as the Triton of WHEEL does (the same version built for "
                             "another Python, e.g. the GPU machine's cp312 wheel)")
    parser.add_argument("--use-cache", default=None, metavar="DIR",
                        help="on the machine that uses a filled cache: point it at DIR and check that it fits "
                             "this Triton and GPU (exit 1 if not); compiles nothing")
    return parser


def _check_args(parser: argparse.ArgumentParser, args) -> Tuple[List[int], List[str], str, Optional[bytes]]:
    """(archs, configs, autotune mode, Triton key or None) from the arguments; bad ones end in
    ``parser.error`` (exit 2) before any compile."""
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch takes compute capabilities like 80,90, got {args.arch!r}")
    bad = [a for a in archs if a not in KNOWN_TARGETS]
    if bad or not archs:
        parser.error(f"--arch: known targets are {', '.join(map(str, KNOWN_TARGETS))}, got {args.arch!r}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.triton_key_from and not args.fill_cache:
        parser.error("--triton-key-from only applies to --fill-cache")
    if args.fill_cache and os.path.exists(args.fill_cache) and not os.path.isdir(args.fill_cache):
        parser.error(f"--fill-cache: {args.fill_cache!r} exists and is not a folder")
    from cmd_kernels.bench import CONFIGS
    configs = args.config or list(CONFIGS)
    key = None
    try:
        for c in configs:
            cases(c)  # an unknown config fails here, before any compile
        if args.triton_key_from:
            key = triton_key_from_wheel(args.triton_key_from)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        parser.error(str(e))
    return archs, configs, "off" if args.quick else args.autotune, key


def _compile_all(work: List, jobs: int, scratch: str, key) -> List[dict]:
    """Run every compile task (slow ones first), in ``jobs`` processes; the rows in ``work``'s order."""
    order = sorted(range(len(work)), key=lambda i: _cost_rank(work[i]))
    done: Dict[int, dict] = {}
    if jobs == 1:
        for i in order:
            done[i] = run_task(work[i])
            _print_row(done[i])
    else:
        import multiprocessing
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(scratch, key)) as pool:
            for i, r in zip(order, pool.map(run_task, [work[i] for i in order])):
                done[i] = r
                _print_row(r)
    rows = [done[i] for i in range(len(work))]
    _share_ptxas_info(rows)
    return rows


def _summarise(rows: List[dict], seconds: float) -> Tuple[dict, List]:
    """The run's summary and its (row, problems) findings, printed."""
    failed = [(r, p) for r in rows for p in [problems(r)] if p]
    summary = {"compiles": len(rows), "unique_kernels": len({r["hash"] for r in rows if r.get("ok")}),
               "failed": sum(not r["ok"] for r in rows), "problems": len(failed), "seconds": round(seconds, 1)}
    print(f"{summary['compiles']} compiles ({summary['unique_kernels']} distinct kernels) in {seconds:.1f} s: "
          f"{summary['failed']} failed to compile, {len(failed)} rows with problems", flush=True)
    for r, p in failed:
        print(f"PROBLEM sm_{r['arch']} {r['dtype']} {r['kernel']} {r['config']} {r['launch']}: {'; '.join(p)}")
    return summary, failed


def _fill_cache(args, rows: List[dict], scratch: str, key, archs: List[int], configs: List[str], mode: str) -> None:
    """Export the compiled kernels into ``args.fill_cache`` with its manifest."""
    from triton.runtime.cache import triton_key

    from cmd_kernels.bench import _write_json
    os.makedirs(args.fill_cache, exist_ok=True)
    n = export_cache(rows, scratch, args.fill_cache)
    manifest = {"triton": triton.__version__, "triton_key_sha256": _key_digest(key or triton_key()),
                "key_from": os.path.basename(args.triton_key_from) if args.triton_key_from else
                f"this Python ({sys.version.split()[0]})", "archs": archs,
                "backend": {str(a): backend_hash(a) for a in archs}, "configs": configs,
                "autotune": mode, "dtypes": args.dtype or "default", "kernels": n,
                "hashes": sorted({r["hash"] for r in rows if r.get("ok")})}
    _write_json(os.path.join(args.fill_cache, MANIFEST), manifest)
    print(f"filled {args.fill_cache}: {n} kernels for Triton {triton.__version__} "
          f"(key {manifest['triton_key_sha256'][:12]}, {manifest['key_from']}); on the GPU machine run "
          f"python -m cmd_kernels.aot --use-cache DIR, then export TRITON_CACHE_DIR=DIR")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cmd_kernels.aot``: check arguments, (re)start outside the interpreter, compile every task,
    summarise, fill a cache and write the JSON where asked. Exit 1 on a compile problem, 2 on bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.use_cache:
        if not os.path.isdir(args.use_cache):
            parser.error(f"--use-cache: no folder {args.use_cache!r}")
        ok, message = use_cache(args.use_cache)
        print(message)
        return 0 if ok else 1
    archs, configs, mode, key = _check_args(parser, args)
    if INTERPRETED:
        # The kernels were built for the interpreter (TRITON_INTERPRET=1 at import): start again without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        again = list(argv) if argv is not None else sys.argv[1:]
        os.execve(sys.executable, [sys.executable, "-m", "cmd_kernels.aot", *again], env)

    scratch = tempfile.mkdtemp(prefix="cmd-aot-cache-")
    try:
        _init_worker(scratch, key)
        work = tasks(configs, archs, args.dtype, mode, args.unpruned, args.kernel)
        print(f"triton {triton.__version__}, torch {torch.__version__}: {len(work)} compiles "
              f"({mode} configs, sm_{','.join(map(str, archs))}, {args.jobs} process(es))", flush=True)
        start = time.perf_counter()
        rows = _compile_all(work, args.jobs, scratch, key)
        summary, failed = _summarise(rows, time.perf_counter() - start)
        if args.fill_cache:
            _fill_cache(args, rows, scratch, key, archs, configs, mode)
        if args.json:
            from cmd_kernels.bench import _write_json
            _write_json(args.json, {"triton": triton.__version__, "torch": torch.__version__, "autotune": mode,
                                    "archs": archs, "configs": configs, "summary": summary,
                                    "rows": [dict(r, problems=problems(r)) for r in rows]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
