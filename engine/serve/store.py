"""The job store: every accepted job and its state in SQLite (stdlib ``sqlite3``, WAL), its files in the store
folder. What the server accepted survives a crash or ``kill -9``: a job row is committed before the client
hears its id, a video is written atomically (:mod:`engine.atomic`) before its job reads ``completed``, and
:meth:`JobStore.recover` puts the jobs a dead server was running back in the queue.

Layout of a store folder::

    jobs.sqlite3 (+ -wal, -shm)   the jobs table
    videos/<job id>.mp4           finished videos (deleted when they expire)
    inputs/<job id>               uploaded images (image-to-video), deleted with their job

Job ids are made here (``video_`` + 32 hex digits) and file paths only ever from such ids: nothing a client
sends reaches the file system. One process owns a store folder (the server takes a lock file).
"""

import fcntl
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from engine.atomic import fsync_path, write_bytes

STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
MAX_ATTEMPTS = 3  # starts of a job before a restart gives up on it (JobStore.recover)
ID_PATTERN = re.compile(r"^video_[0-9a-f]{32}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    params TEXT NOT NULL,
    batch_key TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    has_input INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    expired_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    timings TEXT,
    error_code TEXT,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, batch_key, seq);
"""


class QueueFull(Exception):
    """The queue holds ``limit`` unfinished jobs; ``retry_after``: seconds a client should wait."""

    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"the queue is full ({limit} unfinished jobs); retry after {retry_after} s")
        self.retry_after = retry_after


class IdempotencyConflict(ValueError):
    """An Idempotency-Key reused with a different request."""


@dataclass
class Job:
    """One row of the jobs table. ``params``: the request as the worker runs it (the API's fields, checked);
    ``batch_key``: jobs with equal keys can share one pipeline call; ``timings``: seconds per stage."""

    id: str
    status: str
    progress: float
    params: Dict[str, Any]
    batch_key: str
    created_at: float
    has_input: bool = False
    idempotency_key: Optional[str] = None
    request_hash: Optional[str] = None
    started_at: Optional[float] = None
    completed_at: Optional[float] = None
    expired_at: Optional[float] = None
    attempts: int = 0
    timings: Dict[str, float] = field(default_factory=dict)
    error_code: Optional[str] = None
    error_message: Optional[str] = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        data = {k: row[k] for k in row.keys() if k != "seq"}
        data["params"] = json.loads(data["params"])
        data["timings"] = json.loads(data["timings"]) if data["timings"] else {}
        data["has_input"] = bool(data["has_input"])
        return cls(**data)


def new_job_id() -> str:
    """A server-made job id: ``video_`` + 32 random hex digits."""
    return "video_" + uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    """Whether ``text`` has the form of a job id (checked before any look-up)."""
    return bool(ID_PATTERN.match(text))


class JobStore:
    """The jobs of one server: ``JobStore(folder, max_queue=256)`` opens (or creates) ``folder``.

    Thread-safe (one connection behind a lock; the HTTP handlers and the engine workers share it). Every
    change is one committed transaction. ``max_queue``: the most unfinished (queued or in-progress) jobs;
    :meth:`submit` raises :class:`QueueFull` beyond it. ``waiters``: a Condition notified on each submit, for
    workers waiting for companions."""

    def __init__(self, folder: str, max_queue: int = 256):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.folder = os.path.abspath(folder)
        self.max_queue = int(max_queue)
        for sub in ("videos", "inputs"):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)
        self._db = sqlite3.connect(os.path.join(self.folder, "jobs.sqlite3"), check_same_thread=False,
                                   isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed job survives a power loss too
        self._db.executescript(_SCHEMA)

    # ------------------------------------------------------------------------------------------- files
    def video_path(self, job_id: str) -> str:
        """Where a job's video lives (the id must have the server's form)."""
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return os.path.join(self.folder, "videos", job_id + ".mp4")

    def input_path(self, job_id: str) -> str:
        """Where a job's uploaded image lives."""
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return os.path.join(self.folder, "inputs", job_id)

    # ------------------------------------------------------------------------------------------- jobs
    def _one(self, sql: str, args: Sequence = ()) -> Optional[Job]:
        row = self._db.execute(sql, args).fetchone()
        return Job.from_row(row) if row is not None else None

    def get(self, job_id: str) -> Optional[Job]:
        """The job with this id, or None."""
        with self._lock:
            return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def by_idempotency_key(self, key: str) -> Optional[Job]:
        with self._lock:
            return self._one("SELECT * FROM jobs WHERE idempotency_key = ?", (key,))

    def list(self, limit: int = 20, after: Optional[str] = None, order: str = "desc") -> List[Job]:
        """Jobs newest first (``order="desc"``) or oldest first, ``limit`` of them, after the job ``after``."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, got {order!r}")
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        with self._lock:
            where, args = "", []
            if after is not None:
                row = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise ValueError(f"no job {after!r} (after)")
                where, args = f"WHERE seq {op} ?", [row["seq"]]
            rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY seq {direction} LIMIT ?",
                                    (*args, int(limit))).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> Dict[str, int]:
        """Jobs per status (every status present, 0 where none)."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    def unfinished(self) -> int:
        counts = self.counts()
        return counts["queued"] + counts["in_progress"]

    def submit(self, params: Dict[str, Any], batch_key: str, image: Optional[bytes] = None,
               idempotency_key: Optional[str] = None, request_hash: Optional[str] = None,
               retry_after: int = 1) -> "tuple[Job, bool]":
        """Queue a job: ``(job, True)``; or, for an ``idempotency_key`` seen before, ``(that job, False)``
        (:class:`IdempotencyConflict` if its ``request_hash`` differs). The uploaded ``image`` is written
        durably before the row is committed. :class:`QueueFull` (with ``retry_after``) when the queue is full."""
        with self._lock:
            if idempotency_key is not None:
                old = self.by_idempotency_key(idempotency_key)
                if old is not None:
                    if old.request_hash != request_hash:
                        raise IdempotencyConflict(f"Idempotency-Key {idempotency_key!r} was used for another "
                                                  f"request (job {old.id})")
                    return old, False
            if self.unfinished() >= self.max_queue:
                raise QueueFull(self.max_queue, retry_after)
            job_id = new_job_id()
            if image is not None:
                write_bytes(self.input_path(job_id), image, durable=True)
            now = time.time()
            self._db.execute(
                "INSERT INTO jobs (id, status, params, batch_key, idempotency_key, request_hash, has_input, "
                "created_at) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, json.dumps(params, sort_keys=True), batch_key, idempotency_key, request_hash,
                 int(image is not None), now))
            self.changed.notify_all()
            return self.get(job_id), True

    def claim(self, limit: int, batch_key: Optional[str] = None) -> List[Job]:
        """Move up to ``limit`` queued jobs (oldest first; of ``batch_key`` if given) to in_progress and return
        them. Atomic: two workers never claim the same job."""
        with self._lock:
            where, args = ("AND batch_key = ?", [batch_key]) if batch_key is not None else ("", [])
            rows = self._db.execute(f"SELECT id FROM jobs WHERE status = 'queued' {where} ORDER BY seq LIMIT ?",
                                    (*args, int(limit))).fetchall()
            ids = [r["id"] for r in rows]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            self._db.execute(f"UPDATE jobs SET status = 'in_progress', started_at = ?, attempts = attempts + 1 "
                             f"WHERE id IN ({marks})", (time.time(), *ids))
            return [self.get(i) for i in ids]

    def set_progress(self, job_ids: Sequence[str], progress: float) -> None:
        """Progress in [0, 1] of running jobs (others are left as they are)."""
        with self._lock:
            marks = ",".join("?" * len(job_ids))
            # Progress is worth no disk flush (a job that restarts starts again at 0): WAL without sync.
            self._db.execute("PRAGMA synchronous=OFF")
            try:
                self._db.execute(f"UPDATE jobs SET progress = ? WHERE status = 'in_progress' AND id IN ({marks})",
                                 (float(progress), *job_ids))
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def complete(self, job_id: str, timings: Dict[str, Any]) -> bool:
        """Mark a running job completed once its video is at :meth:`video_path` (written atomically); the file
        is flushed to the disk first. False, and the file removed, if the job was cancelled or deleted
        meanwhile."""
        path = self.video_path(job_id)
        with self._lock:
            job = self.get(job_id)
            if job is None or job.status != "in_progress":
                self._remove(path)
                return False
            fsync_path(path)
            self._db.execute("UPDATE jobs SET status = 'completed', progress = 1, completed_at = ?, timings = ? "
                             "WHERE id = ?", (time.time(), json.dumps(timings), job_id))
            self._drop_input(job_id)
            return True

    def fail(self, job_id: str, code: str, message: str) -> bool:
        """Mark a running job failed with an error ``code`` (its kind) and a one-line ``message``."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error_code = ?, "
                                   "error_message = ? WHERE id = ? AND status = 'in_progress'",
                                   (time.time(), code, message, job_id))
            if cur.rowcount:
                self._drop_input(job_id)
            return bool(cur.rowcount)

    def requeue(self, job_ids: Sequence[str]) -> int:
        """Put running jobs back in the queue (a worker stopped before finishing them)."""
        with self._lock:
            marks = ",".join("?" * len(job_ids))
            cur = self._db.execute(f"UPDATE jobs SET status = 'queued', progress = 0, started_at = NULL "
                                   f"WHERE status = 'in_progress' AND id IN ({marks})", tuple(job_ids))
            self.changed.notify_all()
            return cur.rowcount

    def cancel(self, job_id: str) -> Optional[Job]:
        """Cancel a queued or running job (a running batch notices at its next step); a finished job is left
        as it is. Returns the job after, or None if there is none."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status = 'cancelled', completed_at = ? "
                                   "WHERE id = ? AND status IN ('queued', 'in_progress')", (time.time(), job_id))
            if cur.rowcount:
                self._drop_input(job_id)
            return self.get(job_id)

    def delete(self, job_id: str) -> Optional[Job]:
        """Delete a job and its files (cancelling it first if unfinished). Returns it as it was, or None."""
        with self._lock:
            job = self.cancel(job_id)
            if job is None:
                return None
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._remove(self.video_path(job_id))
            return job

    def recover(self, max_attempts: int = MAX_ATTEMPTS) -> int:
        """At start: jobs left in_progress by a server that died go back to the queue, unless they were started
        ``max_attempts`` times already (a job that kills its server must not kill every restart): those fail.
        Returns how many went back."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error_code = 'interrupted', "
                             "error_message = 'the server stopped while running this job ' || attempts || ' times' "
                             "WHERE status = 'in_progress' AND attempts >= ?", (time.time(), max_attempts))
            cur = self._db.execute("UPDATE jobs SET status = 'queued', progress = 0, started_at = NULL "
                                   "WHERE status = 'in_progress'")
            return cur.rowcount

    def expire(self, ttl_s: float, now: Optional[float] = None) -> int:
        """Delete the videos of jobs finished more than ``ttl_s`` seconds ago (their rows stay, marked
        expired). Returns how many expired."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') "
                                    "AND expired_at IS NULL AND completed_at < ?", (now - ttl_s,)).fetchall()
            for r in rows:
                self._remove(self.video_path(r["id"]))
                self._db.execute("UPDATE jobs SET expired_at = ? WHERE id = ?", (now, r["id"]))
            return len(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------- helpers
    def _drop_input(self, job_id: str) -> None:
        self._remove(self.input_path(job_id))

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


class StoreLock:
    """An exclusive lock on a store folder (``<folder>/server.lock``) for the life of one server process, so
    that two servers never share one store. Released by the kernel when the process dies (``kill -9``
    included). ValueError naming the folder when another process holds it."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(os.path.abspath(folder), "server.lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ValueError(f"store folder {folder!r} is in use by another server") from None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
