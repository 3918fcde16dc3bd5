"""Helpers shared by the Triton kernels: how the kernels were built, launch configs, argument checks.

``@triton.jit`` decides at decoration time whether a kernel runs compiled (GPU) or in Triton's CPU
interpreter (``TRITON_INTERPRET=1``), so ``INTERPRETED`` records the mode of *our* kernels at import.
GPU launches autotune over several configs; the interpreter runs programs one after another in numpy,
so its launches get large tiles fitted to the problem (few programs), and no autotuning (it needs a GPU).

Triton 3.6 to 3.9: no ``tl.make_block_ptr`` (gone in 3.9), plain pointer arithmetic everywhere. Math is
fp32: elementwise kernels cast fp16/bf16 to fp32 as they load (the interpreter's bf16 arithmetic is
wrong, too); attention feeds fp16/bf16 to the tensor cores on a GPU and upcasts bf16 in the interpreter.

Launch configs on a GPU (``TunedKernel``): each kernel declares, per mode of ``CMD_AUTOTUNE``, the configs
it may use, and an estimate of whether a config fits a target (shared memory, registers), so that configs
that cannot run are pruned before they compile. ``python -m cmd_kernels.aot`` compiles exactly these configs
for sm_80/sm_90 without a GPU and checks them (registers, spills, tensor cores, vector loads).
"""

import contextlib
import functools
import itertools
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch
import triton
from triton.language import standard as _standard

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the native instruction

# Combine functions for ``tl.reduce(x, axis, SUM | MAX)``, exactly what ``tl.sum`` / ``tl.max`` reduce
# with on fp32 (the same code on a GPU). ``tl.sum`` and ``tl.max`` are themselves @jit device functions,
# and the interpreter re-patches triton.language on every device-function call (about 6 ms each in
# Triton 3.9, the main cost of an interpreted kernel), while ``tl.reduce`` with Triton's own combine
# functions is a builtin it maps straight to numpy. Our kernels reduce fp32 values only. For the same
# reason they write ``tl.full(shape, 0.0, tl.float32)``: ``tl.zeros`` is a device function too.
SUM = _standard._sum_combine
MAX = _standard._elementwise_max

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to fill every kernel output with NaN before the launch: a value the kernel forgot to
# write then shows up instead of passing as stale memory.
POISON_OUTPUTS = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (NaN-filled when ``POISON_OUTPUTS``)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


# The kernel argument that carries a launch's grid-size bucket into the autotune key; kernels take it
# unspecialised (``do_not_specialize``), so it changes which tuned config serves a launch, never the binary.
GRID_BUCKET = "GRID_BUCKET"


def grid_bucket(programs: int) -> int:
    """The autotune key's bucket of a launch's independent programs along its batch axis (batch x heads for
    the attention, the batch for the content frame): the next power of two. A tile tuned at batch 1 fills
    the GPU differently from one at batch 8, so each bucket tunes once, and batches 5 to 8 share one."""
    return next_pow2(programs)


# ------------------------------------------------------------------------------ launch configs

AUTOTUNE_MODES = ("off", "fast", "full")
# Tune over the whole (pruned) space by default: the best kernel for long runs and benchmarks; compiled
# binaries persist in the Triton cache, so later processes pay only the timing (a few seconds per shape).
DEFAULT_AUTOTUNE = "full"


def autotune_mode() -> str:
    """The launch-config policy of GPU launches, ``$CMD_AUTOTUNE`` (read at every launch):

    * ``full``: autotune over every config of the kernel's space that fits the GPU (the default);
    * ``fast``: autotune over a few configs per kernel (short runs: less compiling and timing);
    * ``off``: no autotuning: one known-good config per kernel and shape class (tests, short leases).

    The interpreter ignores it (its launches use tiles fitted to the problem). Raises ``ValueError``
    naming the bad value."""
    mode = os.environ.get("CMD_AUTOTUNE", "").strip().lower() or DEFAULT_AUTOTUNE
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"CMD_AUTOTUNE must be one of {', '.join(AUTOTUNE_MODES)}, "
                         f"got {os.environ.get('CMD_AUTOTUNE')!r}")
    return mode


@dataclass(frozen=True)
class Target:
    """What a launch config must fit: compute capability (80 = sm_80), the largest shared memory a block
    may use (bytes, the opt-in limit), the number of SMs."""
    arch: int
    max_shared_mem: int
    num_sms: int


# Targets known without a device (``python -m cmd_kernels.aot``): A100 and H100/H200 SXM.
KNOWN_TARGETS = {80: Target(80, 166912, 108), 90: Target(90, 232448, 132)}


@functools.lru_cache(maxsize=None)
def _device_target(index: int) -> Target:
    from triton.runtime import driver
    props = driver.active.utils.get_device_properties(index)
    return Target(driver.active.get_current_target().arch, props["max_shared_mem"], props["multiprocessor_count"])


def current_target() -> Target:
    """The ``Target`` of the current CUDA device (the one the launch runs on)."""
    from triton.runtime import driver
    return _device_target(driver.active.get_current_device())


Args = Dict[str, Any]  # a launch's arguments by name: tensors, ints, constexprs


class TunedKernel:
    """A Triton kernel with its launch-config space, launched according to ``autotune_mode()``.

    ``space(args, mode)`` lists the configs of a mode for these launch arguments (mode "off": an ordered
    preference list, the first that fits is used); ``fits(config, args, target)`` estimates whether a config
    can run on the target without exceeding its shared memory or spilling registers. Configs that do not fit
    are pruned before they compile (the autotuner's ``early_config_prune``). ``candidates`` is the one place
    that decides what a launch may compile: the launcher and ``cmd_kernels.aot`` both use it.

    ``fn`` is the ``triton.jit`` kernel (possibly under ``triton.heuristics``). In the interpreter there is
    no autotuner: launchers pass block sizes fitted to the problem (``interpret_block``) instead."""

    def __init__(self, fn, key: List[str], configs: Sequence[triton.Config],
                 space: Callable[[Args, str], Sequence[triton.Config]],
                 fits: Optional[Callable[[triton.Config, Args, Target], bool]] = None):
        self.fn = fn
        self.key = key
        self.configs = list(configs)  # every config any mode may pick (what ``space`` draws from)
        self.space = space
        self.fits = fits or (lambda config, args, target: True)
        self.autotuner = None
        if not INTERPRETED:
            # The autotuner asks the prune hook for the candidates of each new key (shape, dtype).
            self.autotuner = triton.autotune(configs=self.configs, key=key,
                                             prune_configs_by={"early_config_prune": self._prune})(fn)

    def candidates(self, args: Args, mode: str, target: Target) -> List[triton.Config]:
        """The configs a launch with these arguments may compile on ``target`` in ``mode``."""
        fitting = [c for c in self.space(args, mode) if self.fits(c, args, target)]
        if not fitting:
            raise RuntimeError(f"{self.name}: no launch config fits sm_{target.arch} "
                               f"({target.max_shared_mem} B of shared memory) for these arguments")
        return fitting[:1] if mode == "off" else fitting

    @property
    def name(self) -> str:
        fn = self.fn
        while hasattr(fn, "fn"):
            fn = fn.fn
        return getattr(fn, "__name__", repr(fn))

    def _prune(self, configs, named_args, **kwargs):
        return self.candidates({**named_args, **kwargs}, autotune_mode(), current_target())

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if INTERPRETED:
                return self.fn[grid](*args, **kwargs)
            mode = autotune_mode()
            if mode == "off":
                named = dict(zip(self.fn.arg_names, args), **kwargs)
                config = self.candidates(named, mode, current_target())[0]
                return self.fn[grid](*args, **kwargs, **config.all_kwargs())
            return self.autotuner[grid](*args, **kwargs)
        return launch


def autotune(key: List[str], configs: Sequence[triton.Config], space: Callable[[Args, str], Sequence[triton.Config]],
             fits: Optional[Callable[[triton.Config, Args, Target], bool]] = None):
    """Decorator: ``TunedKernel(fn, key, configs, space, fits)``."""
    return lambda fn: TunedKernel(fn, key, configs, space, fits)


def config_key(config: triton.Config) -> tuple:
    """A hashable identity of a config: its meta-parameters, num_warps, num_stages."""
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def pick(configs: Sequence[triton.Config], *wanted: tuple) -> List[triton.Config]:
    """The configs of ``configs`` matching ``wanted`` entries ``(meta dict, num_warps, num_stages)``, in
    the order of ``wanted`` (a subset or preference list drawn from one space). Raises ``ValueError``
    for an entry that is not in the space."""
    by_key = {config_key(c): c for c in configs}
    out = []
    for meta, warps, stages in wanted:
        key = (tuple(sorted(meta.items())), warps, stages)
        if key not in by_key:
            raise ValueError(f"config {meta} num_warps={warps} num_stages={stages} is not in the space")
        out.append(by_key[key])
    return out


class Launch(NamedTuple):
    """One kernel launch as a launcher builds it: the kernel (``TunedKernel`` or jit function), its grid
    (tuple, or callable of the meta-parameters), positional arguments and keyword arguments (constexprs,
    and ``num_warps`` where the launcher fixes it). ``cmd_kernels.aot`` compiles the same launches."""
    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict

    def run(self):
        return self.kernel[self.grid](*self.args, **self.kwargs)


def interpret_block(n: int, cap: int, floor: int = 1) -> int:
    """Block covering ``n`` (a power of two, at least ``floor``), at most ``cap``: one program per axis
    where possible, because each interpreted program costs milliseconds of Python."""
    return max(floor, min(cap, next_pow2(n)))


def grid_configs(space: Dict[str, Iterable[int]], num_warps: Iterable[int], num_stages: Iterable[int] = (2,),
                 keep=lambda kw, w: True) -> List[triton.Config]:
    """Cartesian product of block sizes x num_warps x num_stages as Triton configs (``keep`` prunes)."""
    names = list(space)
    out = []
    for values in itertools.product(*space.values()):
        kw = dict(zip(names, values))
        for w in num_warps:
            if not keep(kw, w):
                continue
            for s in num_stages:
                out.append(triton.Config(dict(kw), num_warps=w, num_stages=s))
    return out


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {devices}")


def launch_context(t: torch.Tensor):
    """Context for a kernel launch on ``t``'s device: that GPU in multi-GPU processes; in the
    interpreter, single-threaded numpy BLAS (its tl.dot tiles are small, and threads fighting over
    two shared cores made interpreted attention 3-4x slower), via threadpoolctl when it is installed."""
    if t.is_cuda and not INTERPRETED:
        return torch.cuda.device(t.device)
    if INTERPRETED:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return contextlib.nullcontext()
        return threadpool_limits(1, user_api="blas")
    return contextlib.nullcontext()
