"""The engine worker (engine.serve.worker) on the shipped default model at 2 steps: batching by batch key, a
job's video the same bytes alone, batched and from ``python -m engine.run``, progress, cancellation, shutdown."""

import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("imageio_ffmpeg")

import cmd_kernels  # noqa: E402
from engine.pipeline import CMDPipeline  # noqa: E402
from engine.serve.params import batch_key, check_fields  # noqa: E402
from engine.serve.store import JobStore  # noqa: E402
from engine.serve.worker import EngineWorker  # noqa: E402

FAST = {"steps": 2, "motion_steps": 2}


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second thread only adds sync overhead on these tiny networks
    with cmd_kernels.force_impl("reference"):  # the kernels have their own tests; the interpreter is slow
        yield CMDPipeline.from_pretrained("default")
    torch.set_num_threads(threads)


def submit(store, config, **fields):
    params, _ = check_fields({**FAST, **fields}, config, "default")
    return store.submit(params, batch_key(params))[0]


def run_all(store, pipe, max_batch):
    """Run every queued job with a worker that never loads (the module's pipeline); the batches it made."""
    worker = EngineWorker(store, lambda: pipe, max_batch=max_batch, max_wait_ms=0)
    worker.pipe = pipe
    sizes = []
    while True:
        batch = worker.next_batch(poll_s=0)
        if not batch:
            return sizes
        sizes.append(len(batch))
        worker.run_batch(batch)


def video(store, job):
    with open(store.video_path(job.id), "rb") as f:
        return f.read()


def test_batches_group_compatible_jobs_and_each_video_is_the_same_bytes_alone(tmp_path, pipe):
    prompts = ["a red circle moving right", "a blue square moving down", "a green circle moving left"]
    batched = JobStore(str(tmp_path / "batched"))
    jobs = [submit(batched, pipe.config, prompt=p, seed=10 + i, negative_prompt="blurry" if i == 1 else None)
            for i, p in enumerate(prompts)]
    other = submit(batched, pipe.config, prompt="a red circle", seed=3, guidance=1.0)  # another batch key
    assert run_all(batched, pipe, max_batch=8) == [3, 1]
    for job in jobs + [other]:
        done = batched.get(job.id)
        assert done.status == "completed" and done.progress == 1.0
        assert done.timings["batch_size"] in (3, 1) and done.timings["content"] > 0
    alone = JobStore(str(tmp_path / "alone"))
    singles = [submit(alone, pipe.config, prompt=p, seed=10 + i, negative_prompt="blurry" if i == 1 else None)
               for i, p in enumerate(prompts)]
    assert run_all(alone, pipe, max_batch=1) == [1, 1, 1]
    for job, single in zip(jobs, singles):
        assert video(batched, job) == video(alone, single)
    assert len({video(batched, j) for j in jobs}) == 3  # different prompts and seeds: different videos


def test_a_job_equals_engine_run_with_its_seed(tmp_path, pipe):
    from engine.run import main

    store = JobStore(str(tmp_path / "s"))
    job = submit(store, pipe.config, prompt="a red circle moving right", seed=42)
    run_all(store, pipe, max_batch=4)
    out = tmp_path / "cli.mp4"
    with cmd_kernels.force_impl("reference"):
        assert main(["--prompt", "a red circle moving right", "--seed", "42", "--steps", "2", "--motion-steps", "2",
                     "--out", str(out), "--quiet"]) == 0
    assert out.read_bytes() == video(store, job)


def test_progress_is_reported_per_step_and_a_cancelled_batch_stops(tmp_path, pipe):
    store = JobStore(str(tmp_path / "s"))
    job = submit(store, pipe.config, prompt="a red circle", seed=1, steps=6, motion_steps=6)
    worker = EngineWorker(store, lambda: pipe, max_batch=2, max_wait_ms=0)
    worker.pipe = pipe
    seen = []
    original = store.set_progress

    def record(ids, progress):
        seen.append(progress)
        original(ids, progress)
        if len(seen) == 3:
            store.cancel(job.id)

    store.set_progress = record
    worker.run_batch(worker.next_batch(poll_s=0))
    assert seen == sorted(seen) and 0 < seen[0] < seen[-1] < 1
    assert len(seen) == 3  # stopped at the step after the cancel
    assert store.get(job.id).status == "cancelled"
    assert not (tmp_path / "s" / "videos" / f"{job.id}.mp4").exists()


def test_a_worker_loads_warms_up_runs_and_requeues_on_a_hurried_stop(tmp_path, pipe):
    store = JobStore(str(tmp_path / "s"))
    worker = EngineWorker(store, lambda: pipe, max_batch=4, max_wait_ms=20).start()
    assert worker.ready.wait(120) and worker.error is None
    first = submit(store, pipe.config, prompt="a red circle", seed=1)
    deadline = time.time() + 120
    while store.get(first.id).status != "completed" and time.time() < deadline:
        time.sleep(0.05)
    assert store.get(first.id).status == "completed"
    slow = submit(store, pipe.config, prompt="a blue square", seed=2, steps=200, motion_steps=200)
    while store.get(slow.id).status != "in_progress":
        time.sleep(0.01)
    stopper = threading.Thread(target=worker.stop, kwargs={"grace_s": 0.2})
    stopper.start()
    stopper.join(60)
    assert not worker.alive and store.get(slow.id).status == "queued"  # back in the queue, not lost


def test_a_model_that_cannot_load_is_reported(tmp_path):
    def broken():
        raise ValueError("no such model")

    worker = EngineWorker(JobStore(str(tmp_path / "s")), broken).start()
    worker._thread.join(10)
    assert not worker.ready.is_set() and worker.error == "no such model"
