"""NVTX ranges and per-stage timers.

``nvtx_range(name)`` marks a region for Nsight Systems and for ``torch.profiler`` traces
(``record_function``), so one annotation shows up in both tools. The NVTX range comes from the ``nvtx``
package where it is installed (safe and nearly free without a GPU or a profiler; ranges in domain
``cmd`` with colours per stage), else from ``torch.cuda.nvtx`` on a CUDA build of torch with a GPU (the
GPU image has no ``nvtx`` package; plain ranges, no domain or colour); a CPU torch without the package
gets the ``torch.profiler`` range only (``torch.cuda.nvtx`` raises there). :func:`nvtx_backend` says which.

``StageTimer`` times pipeline stages with CUDA events on a GPU (no sync until the result is read)
and with the wall clock on a CPU.
"""

import contextlib
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch

try:
    import nvtx as _nvtx
except ImportError:  # the package is small and usually present; the engine runs without it
    _nvtx = None

# Colours per stage in the Nsight timeline.
_COLORS = {"text": "green", "content": "blue", "motion": "purple", "decode": "orange", "vae": "red",
           "write": "grey"}


def nvtx_backend() -> Optional[str]:
    """Where NVTX ranges come from here: ``"nvtx"`` (the package), ``"torch.cuda.nvtx"`` (a CUDA torch with a
    GPU, no package) or None (ranges only in torch.profiler traces)."""
    if _nvtx is not None:
        return "nvtx"
    if torch.cuda.is_available():
        return "torch.cuda.nvtx"
    return None


@contextlib.contextmanager
def _torch_nvtx_range(name: str) -> Iterator[None]:
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


@contextlib.contextmanager
def nvtx_range(name: str, color: Optional[str] = None) -> Iterator[None]:
    """An NVTX range (see :func:`nvtx_backend`) plus a torch.profiler range around the block."""
    with contextlib.ExitStack() as stack:
        backend = nvtx_backend()
        if backend == "nvtx":
            stack.enter_context(_nvtx.annotate(name, color=color or _COLORS.get(name.split()[0], "white"),
                                               domain="cmd"))
        elif backend == "torch.cuda.nvtx":
            stack.enter_context(_torch_nvtx_range(name))
        stack.enter_context(torch.profiler.record_function(name))
        yield


class StageTimer:
    """Per-stage durations in seconds. ``with timer.stage("content"): ...`` opens an NVTX range and
    times the block; :meth:`result` returns ``{stage: seconds, ..., "total": seconds}``."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._marks: List[Tuple[str, object, object]] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with nvtx_range(name):
            start = self._mark()
            yield
            self._marks.append((name, start, self._mark()))

    def result(self) -> Dict[str, float]:
        """Durations per stage (summed if a stage ran twice) and their total; syncs once on CUDA."""
        if self.cuda and self._marks:
            self._marks[-1][2].synchronize()
        out: Dict[str, float] = {}
        for name, start, end in self._marks:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            out[name] = out.get(name, 0.0) + seconds
        out["total"] = sum(out.values())
        return out
