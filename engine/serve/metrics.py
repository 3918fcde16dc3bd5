"""The server's Prometheus metrics (prometheus-client), in a registry of its own per app (``GET /metrics``).

=====================================  ==========================================================
metric                                 what it counts
=====================================  ==========================================================
cmd_serve_queue_depth{status}          jobs queued / in progress (read from the store at scrape)
cmd_serve_batch_size                   jobs per pipeline call (histogram)
cmd_serve_stage_seconds{stage}         seconds per pipeline stage of a batch (text, content, ...)
cmd_serve_request_seconds              a job's latency, accepted to completed (histogram)
cmd_serve_http_request_seconds{route}  HTTP handling time per route (histogram)
cmd_serve_videos_total                 videos completed
cmd_serve_videos_per_second            videos completed over the last minute, per second
cmd_serve_failures_total{kind}         failures by kind: invalid_request, queue_full, unauthorized,
                                       out_of_memory, generation_error, write_error
=====================================  ==========================================================
"""

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
RATE_WINDOW_S = 60.0


class ServeMetrics:
    """The metrics of one server; ``store``: the :class:`engine.serve.store.JobStore` whose queue depth is
    reported."""

    def __init__(self, store):
        self.registry = r = CollectorRegistry()
        depth = Gauge("cmd_serve_queue_depth", "Jobs queued or in progress", ["status"], registry=r)
        for status in ("queued", "in_progress"):
            depth.labels(status).set_function(lambda s=status: store.counts()[s])
        self.batch_size = Histogram("cmd_serve_batch_size", "Jobs per pipeline call",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.stage = Histogram("cmd_serve_stage_seconds", "Seconds per pipeline stage of a batch", ["stage"],
                               buckets=SECONDS, registry=r)
        self.request = Histogram("cmd_serve_request_seconds", "Job latency, accepted to completed",
                                 buckets=SECONDS, registry=r)
        self.http = Histogram("cmd_serve_http_request_seconds", "HTTP handling time", ["route"],
                              buckets=SECONDS, registry=r)
        self.videos = Counter("cmd_serve_videos", "Videos completed", registry=r)
        Gauge("cmd_serve_videos_per_second", f"Videos completed per second over the last {RATE_WINDOW_S:g} s",
              registry=r).set_function(self._rate)
        self.failures = Counter("cmd_serve_failures", "Failures by kind", ["kind"], registry=r)
        self._done = collections.deque()
        self._lock = threading.Lock()

    def _rate(self) -> float:
        with self._lock:
            cutoff = time.monotonic() - RATE_WINDOW_S
            while self._done and self._done[0] < cutoff:
                self._done.popleft()
            return len(self._done) / RATE_WINDOW_S

    def completed(self, job) -> None:
        """A job completed (``job``: its store row)."""
        self.videos.inc()
        with self._lock:
            self._done.append(time.monotonic())
        if job is not None and job.completed_at is not None:
            self.request.observe(job.completed_at - job.created_at)

    def batch(self, size: int, timings) -> None:
        """A pipeline call of ``size`` jobs and its stage timings (seconds)."""
        self.batch_size.observe(size)
        for stage, seconds in timings.items():
            if stage != "total":
                self.stage.labels(stage).observe(seconds)

    def failed(self, kind: str) -> None:
        self.failures.labels(kind).inc()

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
