"""One request from the CLI to the pipeline (engine.request): flags and keyword arguments are validated once
into a Request, cache options included, and ``pipe.run(request, ...)`` generates exactly what the
diffusers-style ``pipe(...)`` does with the same arguments."""

import os
import random

import numpy as np
import pytest
import torch

import engine.request
from engine.backends.eager import EagerBackend
from engine.cache import CachePlan
from engine.configs import load_config
from engine.pipeline import CMDPipeline
from engine.request import REQUEST_ARGS, Request, check_request
from engine.run import main as run_main

CONFIG = os.path.join(os.path.dirname(__file__), "tiny_config.json")
TINY = "random:" + CONFIG
STEPS = 3

pytestmark = pytest.mark.usefixtures("fast_cpu")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def pipe():
    return CMDPipeline.from_pretrained(TINY)


def test_check_request_folds_in_the_cache_options():
    cfg = load_config(CONFIG)
    start = round(random.uniform(0.1, 0.4), 2)
    req = check_request(cfg, num_inference_steps=10, motion_steps=5, guidance_interval=(start, 1.0))
    assert isinstance(req, Request) and isinstance(req.cache_plan, CachePlan)
    assert req.cache_plan.mode is None and req.cache_plan.guidance_interval == (start, 1.0)
    assert req.cache_plan.content.cfg == tuple(i / 10 >= start for i in range(10))
    assert req.cache_plan.motion.steps == 5 and not req.image_to_video
    dyn = check_request(cfg, cache="dynamic", cache_threshold=0.3)
    assert dyn.cache_plan.content.threshold == dyn.cache_plan.motion.threshold == 0.3
    # The same rules as the pipeline call, from the config alone, one line each.
    for kwargs, needle in ((dict(cache="sometimes"), "cache must be None, 'static' or 'dynamic', got 'sometimes'"),
                           (dict(cache_threshold=0.1), "cache_threshold=0.1 needs cache='static' or 'dynamic'"),
                           (dict(guidance_interval=(0.8, 0.2)), "guidance_interval is reversed"),
                           (dict(cache="static"), "has no static cache schedule")):
        with pytest.raises(ValueError, match=needle) as err:
            check_request(cfg, **kwargs)
        assert "\n" not in str(err.value)
    no_dynamic = type("Static", (EagerBackend,), {"name": "static-only", "cache_modes": ("static",)})
    with pytest.raises(ValueError, match="backend 'static-only' supports cache='static'"):
        check_request(cfg, cache="dynamic", backend=no_dynamic)
    assert set(REQUEST_ARGS) == {"num_frames", "height", "width", "num_inference_steps", "motion_steps",
                                 "guidance_scale", "motion_guidance_scale", "scheduler", "num_videos_per_prompt",
                                 "motion_variations", "cache", "cache_threshold", "guidance_interval"}


@pytest.mark.parametrize("kwargs", [dict(), dict(guidance_interval=(0.3, 0.7), motion_variations=2),
                                    dict(cache="dynamic", cache_threshold=0.05, num_videos_per_prompt=2)])
def test_run_of_a_request_equals_the_call(pipe, kwargs):
    seed = random.randrange(10_000)
    prompts = ["a red circle moving right", "a blue square moving up"]
    args = dict(num_inference_steps=STEPS, motion_steps=STEPS, guidance_scale=3.5, **kwargs)
    called = pipe(prompts, generator=seed, progress=False, output_type="pt", **args)
    request = check_request(pipe.config, **args)
    ran = pipe.run(request, prompts, generator=seed, progress=False, output_type="pt")
    assert torch.equal(ran.frames, called.frames) and torch.equal(ran.motion, called.motion)
    assert ran.evaluations == called.evaluations and ran.prompts == called.prompts


def test_run_checks_what_the_request_cannot_know(pipe):
    req = check_request(pipe.config, num_inference_steps=STEPS, motion_steps=STEPS)
    with pytest.raises(TypeError, match="request must be an engine.request.Request"):
        pipe.run(dict(num_inference_steps=STEPS), "a red circle")
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"checked for text-to-video \(image_to_video=False\), but image is given"):
        pipe.run(req, "a red circle", image=image)
    i2v = check_request(pipe.config, num_inference_steps=STEPS, motion_steps=STEPS, image_to_video=True)
    with pytest.raises(ValueError, match=r"checked for image-to-video .* but image is missing"):
        pipe.run(i2v, "a red circle")
    with pytest.raises(ValueError, match="unknown output_type 'video'"):
        pipe.run(req, "a red circle", output_type="video")
    out = pipe.run(i2v, "moving left", image=image, generator=0, progress=False, output_type="latent")
    assert out.evaluations["content"] == 0 and out.frames is None
    # A dynamic request checked without a backend, run on one that cannot split its networks.
    dyn = check_request(pipe.config, num_inference_steps=STEPS, motion_steps=STEPS, cache="dynamic")
    backend = pipe.backend
    try:
        static_only = type("Static", (EagerBackend,), {"name": "static-only", "cache_modes": ("static",)})
        pipe.set_backend(static_only(pipe.model, pipe.device, pipe.dtype))
        with pytest.raises(ValueError, match="backend 'static-only' supports cache='static'"):
            pipe.run(dyn, "a red circle", generator=0, progress=False)
    finally:
        pipe.set_backend(backend)


def test_the_cli_validates_once_and_runs_the_request(tmp_path, capsys, monkeypatch):
    """engine.run checks its flags into one Request before loading weights and hands that very object to
    pipe.run for every batch: no second check_request, no second cache plan."""
    import engine.cache

    checks, plans, runs = [], [], []
    real_check, real_plan, real_run = check_request, engine.cache.plan_cache, CMDPipeline.run

    def check(*args, **kwargs):
        checks.append(kwargs)
        return real_check(*args, **kwargs)

    def plan(*args, **kwargs):
        plans.append(args)
        return real_plan(*args, **kwargs)

    def run(self, request, *args, **kwargs):
        runs.append(request)
        return real_run(self, request, *args, **kwargs)

    monkeypatch.setattr(engine.request, "check_request", check)
    monkeypatch.setattr(engine.request, "plan_cache", plan)
    monkeypatch.setattr(CMDPipeline, "run", run)
    (tmp_path / "prompts.txt").write_text("a red circle moving right\na blue square moving up\na white triangle\n")
    code = run_main(["--prompts-file", str(tmp_path / "prompts.txt"), "--out-dir", str(tmp_path / "out"),
                     "--format", "npy", "--model", TINY, "--batch-size", "2", "--steps", "2", "--motion-steps", "2",
                     "--guidance-interval", "0.2", "0.8", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert len(checks) == 1 and checks[0]["guidance_interval"] == [0.2, 0.8]
    assert len(plans) == 1
    assert len(runs) == 2 and runs[0] is runs[1] and runs[0].cache_plan.guidance_interval == (0.2, 0.8)
    assert sorted(os.listdir(tmp_path / "out")) == ["000.npy", "001.npy", "002.npy"]
