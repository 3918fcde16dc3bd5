"""Crash-safe writes, for every package: a reader sees the old file (or folder) or the new one, never half
of either, and a failure (an exception, Ctrl-C) leaves the old content and no temporary file behind.

How: write under a temporary name beside the target (same filesystem), then one ``os.replace`` / rename.
``durable=True`` also makes the result survive a power loss or kernel crash: every written file is fsynced
before the rename, and the parent folder after it (the rename itself lives in the folder's entries).
Folders (:func:`atomic_dir`: checkpoints, model and export folders, costly to make again) are durable by
default; files are not (videos, reports: a fsync per file would slow a long run for little).

One writer at a time (:func:`output_lock`): a command that fills an output folder or file (a training run
folder, an export, a calibration, an evaluation report) holds an advisory lock on it while it works, and a
second command given the same output refuses in one line instead of mixing its files with the first's.
"""

import fcntl
import json
import os
import socket
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Iterator, List


def fsync_path(path: str) -> None:
    """Flush a file's or folder's data and metadata to the disk. Folders: skipped where the platform
    cannot open them (the rename stays atomic, only not durable there)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    """fsync every file below ``folder``, then each folder, deepest first (files written by any library)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(root)


@contextmanager
def atomic_path(path: str, suffix: str = "", durable: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write; on success it is renamed over ``path``
    (world-readable, like any output), on any failure (Ctrl-C included) removed. ``suffix`` keeps an
    extension for writers that choose the format from the name. ``durable``: fsync the file, then the
    folder. The folder must exist."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if durable:
        fsync_path(folder)


def write_bytes(path: str, data: bytes, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_path`), making its folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, durable=durable) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str, durable: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str, data: Any, indent: int = 2, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` as JSON (``indent``, a final newline) atomically. Raises TypeError
    for data JSON cannot hold, before anything is written."""
    write_text(path, json.dumps(data, indent=indent) + "\n", durable=durable)


def check_output(path: str, folder: bool = False, flag: str = "--out") -> str:
    """Check, before a long run, that its result can be written at ``path`` (a file, or with ``folder``
    a folder the run fills): not the other kind of thing already, a writable folder if it is one, and below a
    folder that exists or can be made (its nearest existing ancestor is a writable folder). Every CLI checks
    its outputs with this, before any model loads. Returns ``path``; a one-line ValueError
    naming ``flag`` and the path otherwise. Nothing is created."""
    want, other = ("a folder", "a file") if folder else ("a file", "a folder")
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise ValueError(f"{flag} is {want}, got {path!r}, which is {other}")
    if folder and os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r} cannot be written: it is not a writable folder")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r} cannot be written: {parent!r} is not a writable folder")
    return path


@contextmanager
def atomic_dir(path: str, durable: bool = True) -> Iterator[str]:
    """Yield a new temporary folder ``.tmp-<name>-*`` beside ``path`` to fill; on success it replaces ``path``
    (an existing folder is first moved aside under ``.old-<name>-*``, then removed; only a hard kill between
    the two renames leaves no ``path``, with the old folder still there); on any failure it is deleted and
    ``path`` is as before. ``durable``: every file and folder written is fsynced before the rename, the
    parent folder after it.

    Raises ValueError, before any work, when ``path`` exists and is not a folder."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output path exists and is not a folder: {path!r}")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    old = aside = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; this one becomes an ordinary output
        yield tmp
        if durable:
            _fsync_tree(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
            aside = os.path.join(old, name)
            os.rename(path, aside)
        os.rename(tmp, path)
    except BaseException:
        if aside is not None and os.path.isdir(aside) and not os.path.exists(path):
            os.rename(aside, path)  # the new folder did not go in: the old one goes back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if durable:
        fsync_path(parent)


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


class OutputBusy(ValueError):
    """Another live process holds the output (:func:`output_lock`): bad input, one line, exit code 2."""


def lock_file(path: str) -> str:
    """The lock file of an output ``path``: ``.<name>.lock`` beside it. Beside, not inside: export and model
    folders are replaced whole (:func:`atomic_dir`), which would take a lock inside them along."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.lock")


@contextmanager
def output_lock(path: str, flag: str = "--out") -> Iterator[str]:
    """Hold the one-writer lock of the output file or folder ``path`` for the block (yields the lock file).
    Raises :class:`OutputBusy` (a ValueError naming ``flag``, the path and the holder's pid and host) at once
    when another process holds it; never waits.

    The lock is ``fcntl.flock`` on :func:`lock_file`, which the operating system releases when its process
    ends however it ends (kill -9 included), so a crashed run never leaves its output locked; the file is
    removed when the block ends. Creates the folder the lock file lives in (the output's parent), nothing
    else. Advisory and per host: every writer of the project takes it; processes on other machines sharing a
    network file system are covered only where that file system supports flock."""
    lock = lock_file(path)
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    fd = _acquire(lock, path, flag)
    try:
        yield lock
    finally:
        try:
            os.unlink(lock)  # while still held, so that no one else holds the file removed
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the lock


def _acquire(lock: str, path: str, flag: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise OutputBusy(f"{flag} {path!r} is being written by another process"
                             f"{f' ({holder})' if holder else ''}: wait for it to end, or choose another {flag}"
                             ) from None
        # A holder that ended between our open and our lock removed the file we opened: lock the new one.
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            return fd
        os.close(fd)
