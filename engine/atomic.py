"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterator, List


@contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write; on success it is renamed over ``path``
    (world-readable, like any output), on any failure (Ctrl-C included) removed. ``suffix`` keeps an
    extension for writers that choose the format from the name. The folder must exist."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) and SIGTERM until the block ends, then deliver them to the handlers in place
    before. For a block in which a child process writes a temporary file (ffmpeg): interrupted while the
    child starts or runs, the child is orphaned or killed without a wait, and it can create the file again
    after :func:`atomic_path` removed it. A no-op outside the main thread (where signals are handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: List[int] = []
    # None: a handler not set from Python, which could not be put back; leave that signal alone.
    before = {s: h for s in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(s)) is not None}
    for s in before:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)  # KeyboardInterrupt here, under Python's default SIGINT handler
