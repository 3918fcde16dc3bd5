"""The engine worker: one thread per device that owns a pipeline and runs the store's queued jobs in batches.

It takes the oldest queued job, then every queued job whose parameters can share its pipeline call (the same
:func:`engine.serve.params.batch_key`: size, steps, scheduler, guidance, cache mode, text or image) up to
``max_batch``, waiting at most ``max_wait_ms`` for companions, and runs them as one
:meth:`engine.pipeline.CMDPipeline.run` call. Each job's noise comes from its own generator seeded with its seed
(the pipeline draws noise per prompt on the CPU), so a job's video is the same bytes alone or in a batch, and
the same as ``python -m engine.run --prompt P --seed S``.

Progress comes from the pipeline's ``callback_on_step_end`` (both denoising loops); the same callback stops a
batch whose jobs were all cancelled, or that must give way to a shutdown (its jobs go back to the queue).
"""

import logging
import os
import threading
import time
from typing import Callable, List, Optional

import torch

from engine.cli import one_line
from engine.serve.params import request_of
from engine.serve.store import Job, JobStore

log = logging.getLogger("engine.serve")

# The share of a job's progress the denoising loops cover; decoding and writing the video make the rest.
LOOP_SHARE = 0.95
WRITERS = 4  # videos of a batch written at once


class _Stop(Exception):
    """Raised from the step callback to end a batch early; ``requeue``: its jobs go back to the queue."""

    def __init__(self, requeue: bool):
        super().__init__("stopped")
        self.requeue = requeue


def failure_kind(error: BaseException) -> str:
    """The kind of a failed job (its error code and the failures metric's label)."""
    if isinstance(error, torch.OutOfMemoryError):
        return "out_of_memory"
    if isinstance(error, (ValueError, TypeError, FileNotFoundError)):
        return "invalid_request"
    return "generation_error"


class EngineWorker:
    """Runs the jobs of ``store`` on one pipeline. ``load_pipeline()``: builds the pipeline (called on the
    worker's own thread, so the server answers /healthz while weights load); ``backend``: the backend class
    (request checks); ``metrics``: an :class:`engine.serve.metrics.ServeMetrics` or None.

    :attr:`ready` is set once the pipeline is loaded and warm (one small generation ran); :attr:`error` holds
    why it could not load. :meth:`stop` ends the thread: a batch that does not finish within the grace period
    is stopped at its next step and its jobs go back to the queue."""

    def __init__(self, store: JobStore, load_pipeline: Callable, max_batch: int = 8, max_wait_ms: float = 50,
                 backend=None, metrics=None, name: str = "worker-0"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not (max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.store, self.load_pipeline = store, load_pipeline
        self.max_batch, self.max_wait = int(max_batch), max_wait_ms / 1000
        self.backend, self.metrics, self.name = backend, metrics, name
        self.pipe = None
        self.ready = threading.Event()
        self.error: Optional[str] = None
        self._stopping = threading.Event()  # take no new batch
        self._abort = threading.Event()  # stop the running batch at its next step
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # ------------------------------------------------------------------------------------------ life
    def start(self) -> "EngineWorker":
        self._thread.start()
        return self

    def stop(self, grace_s: float = 30.0) -> None:
        """Take no new batch; let the running one finish within ``grace_s`` seconds, else stop it and re-queue
        its jobs. Returns when the thread has ended."""
        self._stopping.set()
        if self._thread.ident is None:  # never started
            return
        with self.store.changed:
            self.store.changed.notify_all()
        self._thread.join(grace_s)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            self.pipe = self.load_pipeline()
            self._warm_up()
        except Exception as e:  # noqa: BLE001 -- reported by /readyz and the log, the server stays up
            self.error = one_line(e)
            log.error("%s: cannot load the model: %s", self.name, self.error)
            return
        self.ready.set()
        log.info("%s: ready", self.name)
        while not self._stopping.is_set():
            batch = self.next_batch()
            if batch:
                self.run_batch(batch)

    def _warm_up(self) -> None:
        """One small generation, so that the first job does not pay for first-call costs."""
        from engine.request import check_request

        request = check_request(self.pipe.config, num_inference_steps=1, motion_steps=1, backend=self.backend)
        self.pipe.run(request, ["warm-up"], generator=0, progress=False)

    # ------------------------------------------------------------------------------------------ batching
    def next_batch(self, poll_s: float = 0.5) -> List[Job]:
        """The next batch: the oldest queued job and up to ``max_batch - 1`` companions of its batch key,
        waiting at most ``max_wait`` seconds for them. Empty if the queue stayed empty for ``poll_s``."""
        store = self.store
        with store.changed:
            batch = store.claim(1)
            if not batch:
                store.changed.wait(poll_s)
                return []
        key = batch[0].batch_key
        batch += store.claim(self.max_batch - 1, key)
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch and not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with store.changed:
                store.changed.wait(left)
            batch += store.claim(self.max_batch - len(batch), key)
        return batch

    def run_batch(self, jobs: List[Job]) -> None:
        """Run ``jobs`` (claimed, one batch key) as one pipeline call and store each one's video or failure."""
        ids = [j.id for j in jobs]
        started = time.perf_counter()
        try:
            result = self._generate(jobs)
        except _Stop as stop:
            if stop.requeue:
                self.store.requeue(ids)
            return
        except Exception as e:  # noqa: BLE001 -- a job's failure is its result; the worker goes on
            kind, message = failure_kind(e), one_line(e)
            log.error("%s: batch of %d failed (%s): %s", self.name, len(jobs), kind, message)
            for job in jobs:
                if self.store.fail(job.id, kind, message) and self.metrics:
                    self.metrics.failed(kind)
            return
        self._store_videos(jobs, result, time.perf_counter() - started)

    def _generate(self, jobs: List[Job]):
        params = jobs[0].params
        request = request_of(params, self.pipe.config, self.backend)
        image = [self.store.input_path(j.id) for j in jobs] if params["image"] else None
        negatives = [j.params["negative_prompt"] or "" for j in jobs]
        # One generator per job, seeded with its seed: what engine.run gives prompt 0 of --seed S.
        generators = [torch.Generator().manual_seed(j.params["seed"]) for j in jobs]
        total = request.motion_steps + (0 if request.image_to_video else request.steps)
        done = [0]

        def on_step(pipe, step, timestep, info):
            done[0] += 1
            self._check_running(jobs)
            self.store.set_progress([j.id for j in jobs], LOOP_SHARE * done[0] / total)

        return self.pipe.run(request, [j.params["prompt"] for j in jobs], negative_prompt=negatives,
                             generator=generators, image=image, progress=False, callback_on_step_end=on_step)

    def _check_running(self, jobs: List[Job]) -> None:
        """Raise :class:`_Stop` when the batch must end: a shutdown past its grace period (re-queue), or every
        job cancelled."""
        if self._abort.is_set():
            raise _Stop(requeue=True)
        if all((j := self.store.get(job.id)) is None or j.status != "in_progress" for job in jobs):
            raise _Stop(requeue=False)

    def _store_videos(self, jobs: List[Job], result, batch_s: float) -> None:
        """Write each job's video (in parallel: each write is an ffmpeg process) and mark it completed."""
        from concurrent.futures import ThreadPoolExecutor

        from engine.video_io import write_video

        def write(job, frames):
            started = time.perf_counter()
            try:
                write_video(self.store.video_path(job.id), frames, fps=job.params["fps"])
            except Exception as e:  # noqa: BLE001 -- a write error fails this job only
                return one_line(e), 0.0
            return None, time.perf_counter() - started

        with ThreadPoolExecutor(max_workers=min(len(jobs), WRITERS)) as pool:
            written = list(pool.map(write, jobs, result.frames))
        for job, (error, write_s) in zip(jobs, written):
            if error is not None:
                if self.store.fail(job.id, "write_error", error) and self.metrics:
                    self.metrics.failed("write_error")
                continue
            timings = dict(result.timings, write=write_s, batch=batch_s, batch_size=len(jobs),
                           queued=job.started_at - job.created_at if job.started_at else 0.0)
            if not self.store.complete(job.id, timings):
                continue  # cancelled or deleted meanwhile: its video is not kept
            if self.metrics:
                self.metrics.completed(self.store.get(job.id))
        if self.metrics:
            self.metrics.batch(len(jobs), result.timings)
        log.info("%s: batch of %d in %.2f s", self.name, len(jobs), batch_s)
