"""NVTX ranges and per-stage timers.

``nvtx_range(name)`` marks a region for Nsight Systems (the ``nvtx`` package: safe and nearly free
without a GPU or without a profiler attached) and for ``torch.profiler`` traces (``record_function``),
so one annotation shows up in both tools. ``torch.cuda.nvtx`` is not used: it raises on CPU builds.

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


@contextlib.contextmanager
def nvtx_range(name: str, color: Optional[str] = None) -> Iterator[None]:
    """An NVTX range plus a torch.profiler range around the block."""
    with contextlib.ExitStack() as stack:
        if _nvtx is not None:
            stack.enter_context(_nvtx.annotate(name, color=color or _COLORS.get(name.split()[0], "white"),
                                               domain="cmd"))
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
