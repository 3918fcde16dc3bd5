"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of either."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from engine.atomic import atomic_path


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it over ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(path: str, data: Any) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


@contextmanager
def new_dir(path: str) -> Iterator[str]:
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` in one rename
    (an existing ``path`` is moved aside first and then removed); on failure it is deleted."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output path exists and is not a folder: {path!r}")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes folders private; this one becomes an ordinary output
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(path)}-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
