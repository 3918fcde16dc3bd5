"""The job store (engine.serve.store): SQLite rows, atomic claims, idempotency, the bounded queue, recovery,
expiry and the store lock. No model: these run in well under a second."""

import os
import sqlite3
import threading
import time

import pytest

pytest.importorskip("fastapi")

from engine.serve.store import (IdempotencyConflict, JobStore, QueueFull, StoreLock, is_job_id,  # noqa: E402
                                new_job_id)

PARAMS = {"prompt": "a red circle", "seed": 1, "image": False}


@pytest.fixture
def store(tmp_path):
    s = JobStore(str(tmp_path / "store"), max_queue=4)
    yield s
    s.close()


def test_a_submitted_job_is_queued_with_a_server_made_id_and_survives_reopening(tmp_path):
    folder = str(tmp_path / "s")
    s = JobStore(folder)
    job, new = s.submit(PARAMS, "k")
    assert new and job.status == "queued" and job.progress == 0 and is_job_id(job.id)
    s.close()
    again = JobStore(folder)
    assert again.get(job.id).params == PARAMS
    mode = sqlite3.connect(os.path.join(folder, "jobs.sqlite3")).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    again.close()


def test_ids_are_checked_before_any_path_is_made(store):
    assert not is_job_id("../../etc/passwd") and not is_job_id("video_" + "0" * 31)
    with pytest.raises(ValueError, match="not a job id"):
        store.video_path("../x")
    assert is_job_id(new_job_id())


def test_claims_take_the_oldest_of_one_batch_key_and_never_twice(store):
    a, _ = store.submit(PARAMS, "k1")
    b, _ = store.submit(PARAMS, "k2")
    c, _ = store.submit(PARAMS, "k1")
    first = store.claim(1)
    assert [j.id for j in first] == [a.id] and first[0].status == "in_progress" and first[0].attempts == 1
    assert [j.id for j in store.claim(5, "k1")] == [c.id]
    assert [j.id for j in store.claim(5)] == [b.id]
    assert store.claim(5) == []


def test_concurrent_claims_share_no_job(tmp_path):
    s = JobStore(str(tmp_path / "s"), max_queue=200)
    for _ in range(100):
        s.submit(PARAMS, "k")
    got, threads = [], []

    def take():
        while True:
            jobs = s.claim(3, "k")
            if not jobs:
                return
            got.extend(j.id for j in jobs)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 100 and len(set(got)) == 100
    s.close()


def test_an_idempotency_key_returns_the_same_job_and_refuses_another_request(store):
    job, new = store.submit(PARAMS, "k", idempotency_key="abc", request_hash="h1")
    again, new_again = store.submit(PARAMS, "k", idempotency_key="abc", request_hash="h1")
    assert new and not new_again and again.id == job.id
    with pytest.raises(IdempotencyConflict, match="'abc' was used for another request"):
        store.submit(PARAMS, "k", idempotency_key="abc", request_hash="h2")
    assert store.counts()["queued"] == 1


def test_the_queue_is_bounded_and_a_retry_of_an_accepted_job_still_answers(store):
    for i in range(4):
        store.submit(PARAMS, "k", idempotency_key=f"key{i}", request_hash="h")
    with pytest.raises(QueueFull, match="queue is full") as e:
        store.submit(PARAMS, "k", retry_after=7)
    assert e.value.retry_after == 7
    assert store.submit(PARAMS, "k", idempotency_key="key0", request_hash="h")[1] is False
    store.claim(1)
    store.fail(store.list(order="asc")[0].id, "generation_error", "boom")
    store.submit(PARAMS, "k")  # a finished job frees its place


def test_recovery_requeues_running_jobs_and_keeps_finished_ones(tmp_path):
    folder = str(tmp_path / "s")
    s = JobStore(folder)
    done, _ = s.submit(PARAMS, "k")
    running, _ = s.submit(PARAMS, "k")
    queued, _ = s.submit(PARAMS, "k")
    s.claim(2)
    with open(s.video_path(done.id), "wb") as f:
        f.write(b"video")
    assert s.complete(done.id, {"total": 1.0})
    s.set_progress([running.id], 0.5)
    s.close()  # as if the process died here
    s = JobStore(folder)
    assert s.recover() == 1
    assert s.get(running.id).status == "queued" and s.get(running.id).progress == 0
    assert s.get(queued.id).status == "queued" and s.get(done.id).status == "completed"
    assert s.get(done.id).timings == {"total": 1.0}
    s.close()


def test_cancel_and_delete(store):
    job, _ = store.submit(PARAMS, "k", image=b"png bytes")
    assert os.path.isfile(store.input_path(job.id))
    store.claim(1)
    assert store.cancel(job.id).status == "cancelled"
    assert not os.path.exists(store.input_path(job.id))
    with open(store.video_path(job.id), "wb") as f:
        f.write(b"late video")
    assert not store.complete(job.id, {})  # finished after a cancel: not kept
    assert not os.path.exists(store.video_path(job.id))
    assert store.delete(job.id).id == job.id and store.get(job.id) is None
    assert store.delete(job.id) is None


def test_finished_videos_expire(store):
    job, _ = store.submit(PARAMS, "k")
    store.claim(1)
    with open(store.video_path(job.id), "wb") as f:
        f.write(b"video")
    store.complete(job.id, {})
    assert store.expire(ttl_s=3600) == 0
    assert store.expire(ttl_s=3600, now=time.time() + 3601) == 1
    assert not os.path.exists(store.video_path(job.id)) and store.get(job.id).expired_at is not None


def test_list_pages_newest_first(store):
    ids = [store.submit(PARAMS, "k")[0].id for _ in range(3)]
    assert [j.id for j in store.list(2)] == ids[::-1][:2]
    assert [j.id for j in store.list(2, after=ids[1])] == [ids[0]]
    assert [j.id for j in store.list(5, order="asc")] == ids


def test_one_server_per_store_folder(tmp_path):
    lock = StoreLock(str(tmp_path))
    with pytest.raises(ValueError, match="in use by another server"):
        StoreLock(str(tmp_path))
    lock.release()
    StoreLock(str(tmp_path)).release()


def test_a_job_that_keeps_stopping_its_server_fails_after_max_attempts(tmp_path):
    folder = str(tmp_path / "s")
    s = JobStore(folder)
    job, _ = s.submit(PARAMS, "k")
    for _ in range(3):
        s.claim(1)
        s.close()  # the server died while running it
        s = JobStore(folder)
        s.recover()
    failed = s.get(job.id)
    assert failed.status == "failed" and failed.error_code == "interrupted"
    assert failed.error_message == "the server stopped while running this job 3 times"
    s.close()
