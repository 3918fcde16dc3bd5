"""``python -m engine.serve`` as a real uvicorn process on 127.0.0.1 with the shipped default model at 2 steps:
a job end to end, ``kill -9`` and restart (nothing accepted lost, an Idempotency-Key retry gets the same job),
SIGTERM (graceful exit 0), and the settings refused before the server starts."""

import os
import signal
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("imageio_ffmpeg")

from benchmarks.serve_load import ServerProcess  # noqa: E402

FAST = {"steps": 2, "motion_steps": 2}


def wait_done(url, video_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{url}/v1/videos/{video_id}", timeout=10).json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"{video_id} not finished in {timeout} s: {job}")


def test_a_server_survives_kill_9_and_stops_gracefully_on_sigterm(tmp_path):
    store = str(tmp_path / "store")
    server = ServerProcess(store, ["--model", "default", "--max-wait-ms", "10", "--threads", "1"]).start()
    try:
        server.wait_ready()
        done = httpx.post(server.url + "/v1/videos", json={"prompt": "a red circle", "seed": 1, **FAST}).json()
        assert wait_done(server.url, done["id"])["status"] == "completed"
        video = httpx.get(f"{server.url}/v1/videos/{done['id']}/content").content
        # A long job, running when the server is killed; a queued one behind it (another batch key).
        key = {"Idempotency-Key": "client-retry-7"}
        running = httpx.post(server.url + "/v1/videos", headers=key,
                             json={"prompt": "a blue square", "seed": 7, "steps": 30, "motion_steps": 30}).json()
        queued = httpx.post(server.url + "/v1/videos", json={"prompt": "a green circle", "seed": 8, **FAST,
                                                             "guidance": 1.0}).json()
        while httpx.get(f"{server.url}/v1/videos/{running['id']}").json()["status"] != "in_progress":
            time.sleep(0.05)
        server.kill()
        server = ServerProcess(store, server.args, port=server.port, log=server.log).start()
        server.wait_ready()
        retry = httpx.post(server.url + "/v1/videos", headers=key,
                           json={"prompt": "a blue square", "seed": 7, "steps": 30, "motion_steps": 30}).json()
        assert retry["id"] == running["id"]  # the same job, not a second one
        assert wait_done(server.url, running["id"])["status"] == "completed"
        assert wait_done(server.url, queued["id"])["status"] == "completed"
        assert httpx.get(f"{server.url}/v1/videos/{done['id']}/content").content == video  # finished: still served
        assert len(httpx.get(server.url + "/v1/videos").json()["data"]) == 3
        # uvicorn shuts down gracefully, then re-raises the signal: exit 0, or "terminated by SIGTERM".
        assert server.terminate() in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.tail(50)
    finally:
        if server.proc.poll() is None:
            server.kill()


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "error: --host 0.0.0.0 is not a loopback address: serving off this machine needs an "
                            "API key (--api-key or $CMD_SERVE_API_KEY)"),
    (["--host", "0.0.0.0", "--api-key", "short"], "error: the API key is too short: 5 characters, at least 16"),
    (["--backend", "fast"], "error: unknown backend 'fast'"),
    (["--max-batch", "0"], "error: --max-batch must be >= 1, got 0"),
    (["--threads", "0"], "error: --threads must be >= 1, got 0"),
    (["--model", "/no/such/model"], "error: "),
])
def test_bad_settings_exit_2_with_one_line_before_serving(tmp_path, capsys, monkeypatch, args, message):
    from engine.serve.__main__ import main

    monkeypatch.delenv("CMD_SERVE_API_KEY", raising=False)
    assert main(["--store", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_the_command_refuses_a_public_address_without_a_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CMD_SERVE_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "engine.serve", "--store", str(tmp_path), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: --host 0.0.0.0 is not a loopback address")
