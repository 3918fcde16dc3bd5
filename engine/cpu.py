"""CPU threads that hold up on a busy machine, without the user knowing about threads.

PyTorch's CPU kernels run on OpenMP threads, one per core by default. On a machine whose cores other
processes also use, that default goes badly: a parallel region ends at a barrier, a thread descheduled for
another process holds up the others, and under OpenMP's default wait policy the waiting threads spin, taking
the CPU time the late thread needs (measured in docs/performance-cpu.md: several times slower than one thread).
Two measures, both off where the user chose for themselves (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, or
``CMD_CPU_THREADS``):

- :func:`set_wait_policy`: ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep), set when ``engine`` is imported.
  OpenMP reads it once, when torch's OpenMP runtime loads: it takes effect only if ``engine`` is imported
  before ``torch`` (every ``python -m engine.*``, ``export``, ``trainer`` command is);
- :func:`threads_for_now` / :func:`cpu_threads`: the pipeline's CPU work runs on as many threads as there are
  cores this process may use (its CPU affinity), a count fixed for the machine, so that a seed gives the same
  video bytes however busy the machine is (PyTorch's CPU reductions split work by thread count).

``CMD_CPU_THREADS``: ``auto`` (the default: the above), ``load`` (as many threads as usable cores no other
runnable process occupies right now, ``/proc/loadavg``, at least one: a little faster on an overloaded machine,
but the video bytes then depend on the load), a number (that many threads), or ``torch`` (leave PyTorch's and
OpenMP's own defaults: what the engine did before).
"""

import os
from contextlib import contextmanager
from typing import Iterator, Optional

ENV = "CMD_CPU_THREADS"


def _mode() -> str:
    return os.environ.get(ENV, "auto").strip().lower() or "auto"


def set_wait_policy() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user set it, ``CMD_CPU_THREADS=torch`` asks for the defaults,
    or OpenMP threads are fixed by ``OMP_NUM_THREADS`` (the user chose). Touches only the environment: call
    it before torch is imported."""
    if _mode() == "torch" or "OMP_WAIT_POLICY" in os.environ or "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; all cores where the platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runnable_others(path: str = "/proc/loadavg") -> Optional[int]:
    """Tasks other than this one the kernel holds runnable right now (``/proc/loadavg``'s fourth field, less
    the one reading it), or None where the platform has no such file."""
    try:
        with open(path) as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - 1)


def threads_for_now(default: int) -> Optional[int]:
    """The thread count the pipeline's CPU work should run with now, or None to leave torch's as it is
    (``CMD_CPU_THREADS=torch``, or ``OMP_NUM_THREADS`` set). ``default``: torch's current count (the most
    used). ValueError for a ``CMD_CPU_THREADS`` that is neither auto, load, torch nor a whole number >= 1."""
    mode = _mode()
    if mode == "torch" or (mode in ("auto", "load") and "OMP_NUM_THREADS" in os.environ):
        return None
    if mode == "auto":
        return max(1, min(default, usable_cores()))
    if mode == "load":
        return max(1, min(default, usable_cores() - (runnable_others() or 0)))
    if not mode.isdigit() or int(mode) < 1:
        raise ValueError(f"{ENV} must be auto, load, torch or a whole number >= 1, got {os.environ[ENV]!r}")
    return int(mode)


@contextmanager
def cpu_threads() -> Iterator[None]:
    """Run the block with :func:`threads_for_now` torch threads, then put the count back (a library user's
    own setting is theirs again after the call)."""
    import torch

    before = torch.get_num_threads()
    want = threads_for_now(before)
    if want is None or want == before:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(before)
