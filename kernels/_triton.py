"""Helpers shared by the Triton kernels: how the kernels were built, launch configs, argument checks.

``@triton.jit`` decides at decoration time whether a kernel runs compiled (GPU) or in Triton's CPU
interpreter (``TRITON_INTERPRET=1``), so ``INTERPRETED`` records the mode of *our* kernels at import.
GPU launches autotune over several configs; the interpreter runs programs one after another in numpy,
so its launches get large tiles fitted to the problem (few programs), and no autotuning (it needs a GPU).

Triton 3.6 to 3.9: no ``tl.make_block_ptr`` (gone in 3.9), plain pointer arithmetic everywhere. Math is
fp32: elementwise kernels cast fp16/bf16 to fp32 as they load (the interpreter's bf16 arithmetic is
wrong, too); attention feeds fp16/bf16 to the tensor cores on a GPU and upcasts bf16 in the interpreter.
"""

import contextlib
import itertools
import os
from typing import Dict, Iterable, List, Sequence

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


def autotune(configs: Sequence[triton.Config], key: List[str]):
    """``triton.autotune`` over ``configs`` on a GPU. In the interpreter (no GPU to time on) there is no
    autotuner: launchers pass block sizes fitted to the problem (``interpret_block``) instead."""
    if INTERPRETED:
        return lambda fn: fn
    return triton.autotune(configs=list(configs), key=key)


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


def can_launch(*tensors: torch.Tensor) -> bool:
    """Whether our kernels can run on these tensors: CUDA tensors with compiled kernels, or any real
    (non-meta) tensors when the kernels were built for the interpreter."""
    if any(t.device.type == "meta" for t in tensors):
        return False
    return INTERPRETED or all(t.is_cuda for t in tensors)


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
