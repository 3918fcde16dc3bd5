"""The HTTP API (engine.serve.app) through FastAPI's TestClient, on the shipped default model at 2 steps: the
job endpoints, every bad input a 4xx with a one-line message and no job left behind, idempotency, the bounded
queue, the API key, limits, health, metrics and the page."""

import io
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("imageio_ffmpeg")

import cmd_kernels  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from engine.serve.app import Server, ServeSettings, create_app  # noqa: E402
from engine.serve.params import Limits  # noqa: E402

FAST = {"steps": 2, "motion_steps": 2}
KEY = "k" * 32


def make_client(tmp_path, **settings):
    settings = {"store": str(tmp_path / "store"), "max_wait_ms": 10, **settings}
    return TestClient(create_app(Server(ServeSettings(**settings))))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second thread only adds sync overhead on these tiny networks
    with cmd_kernels.force_impl("reference"):
        with make_client(tmp_path_factory.mktemp("serve"), max_queue=6,
                         limits=Limits(body_bytes=64 << 10, prompt_chars=200, image_bytes=32 << 10,
                                       image_pixels=128 * 128)) as c:
            wait_ready(c)
            yield c
    torch.set_num_threads(threads)


def wait_ready(client, timeout=300):
    deadline = time.time() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.time() < deadline, client.get("/readyz").json()
        time.sleep(0.1)


def wait_done(client, video_id, timeout=300, headers=None):
    deadline = time.time() + timeout
    while True:
        job = client.get(f"/v1/videos/{video_id}", headers=headers).json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        assert time.time() < deadline, job
        time.sleep(0.05)


def count(client):
    return len(client.get("/v1/videos", params={"limit": 100}).json()["data"])


def png(width=8, height=8, flat=False) -> bytes:
    import imageio.v3 as iio

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if flat:  # a few bytes however many pixels
        pixels[:] = 128
    return iio.imwrite("<bytes>", pixels, extension=".png")


def test_health_ready_docs_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    spec = client.get("/openapi.json").json()
    assert "/v1/videos" in spec["paths"] and "/v1/videos/{video_id}/content" in spec["paths"]
    page = client.get("/")
    assert page.status_code == 200 and '["32x32", "64x64"]' in page.text and "v1/videos" in page.text


def test_a_prompt_alone_makes_a_video_with_the_models_defaults(client):
    job = client.post("/v1/videos", json={"prompt": "a red circle moving right", **FAST}).json()
    assert job["status"] == "queued" and job["object"] == "video" and job["progress"] == 0
    assert job["size"] == "32x32" and job["frames"] == 16 and isinstance(job["seed"], int)
    done = wait_done(client, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None
    assert done["timings"]["content"] > 0 and done["parameters"]["guidance_scale"] == 2.0
    content = client.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert content.content[4:8] == b"ftyp"
    listed = client.get("/v1/videos").json()
    assert listed["object"] == "list" and job["id"] in [v["id"] for v in listed["data"]]


def test_a_form_with_an_image_makes_an_image_to_video_job(client):
    form = {"prompt": "it moves right", "size": "64x64", "seed": "5", "steps": "2", "motion_steps": "2"}
    r = client.post("/v1/videos", data=form, files={"image": ("in.png", png(), "image/png")})
    assert r.status_code == 200, r.text
    done = wait_done(client, r.json()["id"])
    assert done["status"] == "completed" and done["size"] == "64x64" and done["parameters"]["image"] is True
    assert "content" not in done["timings"] or done["timings"]["content"] < 1


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "steps": 0}, "num_inference_steps must be a whole number between 1 and 1000, got 0"),
    ({"prompt": "x", "steps": "many"}, "steps must be an integer, got 'many'"),
    ({"prompt": "x", "size": "48x48"}, "48"),
    ({"prompt": "x", "size": "big"}, "size must be WIDTHxHEIGHT, e.g. 64x64, got 'big'"),
    ({"prompt": "x", "scheduler": "euler"}, "unknown scheduler 'euler'; choose from"),
    ({"prompt": "x", "guidance": -1}, "guidance_scale must be a finite number >= 0, got -1"),
    ({"prompt": "x", "frames": 17}, "17"),
    ({"prompt": "x", "seed": -1}, "seed must be a whole number between 0 and"),
    ({"prompt": "x", "colour": "red"}, "unknown field 'colour'"),
    ({"prompt": "x", "model": "other"}, "model 'other' is not served here"),
    ({"prompt": ""}, "prompt is required"),
    ({}, "prompt is required"),
    ({"prompt": "x" * 201}, "prompt is too long: 201 characters, at most 200"),
    ({"prompt": "w " * 60}, "prompt is too long for the text encoder: "),
    ({"prompt": "x", "negative_prompt": "b " * 60}, "negative_prompt is too long for the text encoder"),
    ({"prompt": "x", "image": "aGk="}, "image must be uploaded as a file"),
    (["x"], "body must be a JSON object, got list"),
])
def test_bad_input_is_a_4xx_with_one_line_and_leaves_no_job(client, body, message):
    before = count(client)
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"]
    assert count(client) == before


def test_bad_bodies_and_uploads(client):
    before = count(client)
    r = client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/videos", content=b"prompt", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/v1/videos", json={"prompt": "x" * (70 << 10)})
    assert r.status_code == 413 and "over the limit of 65536 bytes" in r.json()["error"]["message"]
    for data, message in [(b"not an image", "image cannot be read"), (b"", "image is empty"),
                          (png(200, 200, flat=True), "image is 200x200 = 40000 pixels, over the limit of 16384")]:
        r = client.post("/v1/videos", data={"prompt": "x"}, files={"image": ("a.png", data, "image/png")})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    r = client.post("/v1/videos", data={"prompt": "x"}, files={"video": ("a.png", png(), "image/png")})
    assert r.status_code == 400 and "unexpected file field 'video'" in r.json()["error"]["message"]
    r = client.post("/v1/videos", data={"prompt": "x", "image": "not a file"})
    assert r.status_code == 400 and "image must be uploaded as a file" in r.json()["error"]["message"]
    assert count(client) == before
    r = client.get("/v1/videos", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("limit: ")
    r = client.post("/v1/videos", json={"prompt": "x"}, headers={"Idempotency-Key": "k" * 300})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("idempotency-key: ")
    assert count(client) == before
    assert client.get("/v1/videos/video_nope").status_code == 404
    assert client.get("/v1/videos/../../etc/passwd").status_code == 404


def test_an_idempotency_key_gives_the_same_job(client):
    headers = {"Idempotency-Key": "retry-1"}
    body = {"prompt": "a red circle", "seed": 3, **FAST}
    first = client.post("/v1/videos", json=body, headers=headers).json()
    again = client.post("/v1/videos", json=body, headers=headers).json()
    assert first["id"] == again["id"]
    r = client.post("/v1/videos", json={**body, "seed": 4}, headers=headers)
    assert r.status_code == 409 and "was used for another request" in r.json()["error"]["message"]
    wait_done(client, first["id"])


def test_cancel_delete_and_content_states(client):
    job = client.post("/v1/videos", json={"prompt": "a red circle", "steps": 400, "motion_steps": 400}).json()
    assert client.get(f"/v1/videos/{job['id']}/content").status_code == 409
    assert client.post(f"/v1/videos/{job['id']}/cancel").json()["status"] == "cancelled"
    assert wait_done(client, job["id"])["status"] == "cancelled"
    deleted = client.delete(f"/v1/videos/{job['id']}").json()
    assert deleted == {"id": job["id"], "object": "video.deleted", "deleted": True}
    assert client.get(f"/v1/videos/{job['id']}").status_code == 404


def test_a_full_queue_answers_429_with_retry_after(client):
    ids = []
    for i in range(6):
        r = client.post("/v1/videos", json={"prompt": f"p{i}", "steps": 300, "motion_steps": 300})
        if r.status_code == 429:
            break
        ids.append(r.json()["id"])
    r = client.post("/v1/videos", json={"prompt": "one more"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "queue is full" in r.json()["error"]["message"]
    for i in ids:
        client.post(f"/v1/videos/{i}/cancel")


def test_metrics(client):
    text = client.get("/metrics").text
    for name in ("cmd_serve_queue_depth", "cmd_serve_batch_size_bucket", "cmd_serve_stage_seconds_bucket",
                 "cmd_serve_request_seconds_bucket", "cmd_serve_videos_total", "cmd_serve_videos_per_second",
                 'cmd_serve_failures_total{kind="invalid_request"}', "cmd_serve_http_request_seconds_bucket"):
        assert name in text, name


def test_an_api_key_guards_the_api(tmp_path):
    with cmd_kernels.force_impl("reference"), make_client(tmp_path, api_key=KEY, model="random:default") as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/v1/videos")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert c.get("/v1/videos", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/v1/videos", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        Server(ServeSettings(store=str(tmp_path), backend="fast"))
    with pytest.raises(ValueError, match="no device given"):
        Server(ServeSettings(store=str(tmp_path), devices=[]))
    with pytest.raises(ValueError, match="devices repeat"):
        Server(ServeSettings(store=str(tmp_path), devices=["cpu", "cpu"]))


def test_a_store_serves_one_server(tmp_path):
    first = Server(ServeSettings(store=str(tmp_path), model="random:default"))
    with pytest.raises(ValueError, match="in use by another server"):
        Server(ServeSettings(store=str(tmp_path), model="random:default"))
    first.stop()
