"""Step caching and guidance intervals (engine/cache.py) on tiny random models (CPU): schedules, bad
values, exactness of a schedule that reuses nothing, seeds, batches, image-to-video, motion variations,
the split networks of the dynamic mode, and the per-video decisions of the dynamic mode."""

import os

import numpy as np
import pytest
import torch

from engine.cache import (DiTParts, DynamicStep, Evaluations, OutputHistory, StagePlan, UNetParts, check_schedule,
                          guidance_steps, plan_cache, schedule_from_change)
from engine.configs import load_config
from engine.models import CMDModel
from engine.pipeline import CMDPipeline
from test_pipeline import _spy  # noqa: E402  (tests/engine is on sys.path under pytest)

TINY = "random:" + os.path.join(os.path.dirname(__file__), "tiny_config.json")
STEPS = 6
CALL = dict(num_inference_steps=STEPS, motion_steps=STEPS, progress=False)
MODES = [dict(), dict(cache="static"), dict(cache="static", cache_threshold=0.5),
         dict(cache="dynamic", cache_threshold=0.1), dict(guidance_interval=(0.3, 0.7)),
         dict(cache="static", guidance_interval=(0.0, 0.5)),
         dict(cache="dynamic", cache_threshold=0.5, guidance_interval=(0.5, 1.0))]
MODE_IDS = ["none", "static", "static-0.5", "dynamic", "interval", "static+interval", "dynamic+interval"]

pytestmark = pytest.mark.usefixtures("fast_cpu")  # tests/engine/conftest.py


def wake(module: torch.nn.Module, seed: int = 0) -> None:
    """Untrained DiTs have zero output layers (adaLN-Zero): an all-zero output cannot show a reuse error."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def cache_entry(steps: int = STEPS, content: str = "FRFRRF", motion: str = "FFRRRF") -> dict:
    """Config data (sampling.cache) as engine.calibrate_cache writes it, for ddim at ``steps`` steps."""
    rng = np.random.default_rng(steps)
    key = f"ddim/{steps}"
    return {"reuse": "extrapolate", "threshold": 0.2, "dynamic_threshold": 0.1,
            "schedules": {"content": {key: content}, "motion": {key: motion}},
            "change": {"content": {key: rng.uniform(0.05, 0.3, steps - 1).round(3).tolist()},
                       "motion": {key: rng.uniform(0.05, 0.3, steps - 1).round(3).tolist()}}}


@pytest.fixture(scope="module")
def pipe():
    p = CMDPipeline.from_pretrained(TINY)
    wake(p.model.motion_dit)
    p.config.sampling["cache"] = cache_entry()
    return p


# ------------------------------------------------------------------------------------------ schedules


def test_schedule_from_change_accumulates_and_keeps_first_and_last_steps():
    assert schedule_from_change([0.5] * 5, 0.0) == "FFFFFF"  # threshold 0: every step runs
    assert schedule_from_change([0.01] * 5, 1.0) == "FRRRRF"  # first and last always run
    # accumulated 0.1, 0.2 (< 0.25: reuse), then 0.3 >= 0.25: run, restart; 0.3 >= 0.25: run; last step runs
    assert schedule_from_change([0.1, 0.1, 0.1, 0.3, 0.05], 0.25) == "FRRFFF"
    assert schedule_from_change([], 0.3) == "F"


def test_check_schedule_and_guidance_steps():
    assert check_schedule("FRF", 3, "x") == (True, False, True)
    for bad, needle in (("FRF", "has 3 steps, the loop 4"), ("RFFF", "first step must run"),
                        ("FXFF", "a schedule is a string"), ("", "a schedule is a string")):
        with pytest.raises(ValueError, match=needle):
            check_schedule(bad, 4, "x")
    assert guidance_steps(None, 4) == (True,) * 4
    assert guidance_steps((0.0, 1.0), 4) == (True,) * 4
    assert guidance_steps((0.5, 1.0), 4) == (False, False, True, True)  # steps start at 0, .25, .5, .75
    assert guidance_steps((0.25, 0.5), 4) == (False, True, False, False)
    assert guidance_steps((0.3, 0.3), 4) == (False,) * 4


def test_output_history_reuses_or_extrapolates_the_last_outputs():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    reuse, line = OutputHistory("reuse"), OutputHistory("extrapolate")
    for h in (reuse, line):
        h.store(1, a)
        torch.testing.assert_close(h.predict(2), a)  # one output: nothing to extrapolate from
        h.store(3, b)
    torch.testing.assert_close(reuse.predict(4), b)
    torch.testing.assert_close(line.predict(4), b + (b - a) * 0.5)
    torch.testing.assert_close(line.predict(5), b + (b - a))
    out = torch.randn(2, 3)
    line.store(6, out)
    out.add_(1.0)  # a backend may overwrite its output buffer: the history kept a copy
    torch.testing.assert_close(line.predict(6), out - 1.0)


# ------------------------------------------------------------------------------------------ bad values


@pytest.mark.parametrize("kwargs,needle", [
    (dict(cache="fast"), "cache must be None, 'static' or 'dynamic', got 'fast'"),
    (dict(cache="dynamic", cache_threshold=-0.1), "cache_threshold must be a finite number >= 0, got -0.1"),
    (dict(cache="static", cache_threshold=float("nan")), "cache_threshold must be a finite number >= 0, got nan"),
    (dict(cache="dynamic", cache_threshold="high"), "cache_threshold must be a number, got 'high'"),
    (dict(cache_threshold=0.1), "cache_threshold=0.1 needs cache='static' or 'dynamic'"),
    (dict(guidance_interval=(0.8, 0.2)), r"guidance_interval is reversed: start 0.8 > end 0.2"),
    (dict(guidance_interval=(-0.1, 0.5)), r"guidance_interval must lie in \[0, 1\], got \(-0.1, 0.5\)"),
    (dict(guidance_interval=(0.0, 1.5)), r"guidance_interval must lie in \[0, 1\], got \(0, 1.5\)"),
    (dict(guidance_interval=0.5), r"guidance_interval must be a pair \(start, end\)"),
    (dict(guidance_interval=(0.1, 0.2, 0.3)), r"guidance_interval must be a pair \(start, end\)"),
    (dict(cache="static", num_inference_steps=5),
     r"no static content schedule for ddim/5 .*it has ddim/6.*calibrate_cache"),
    (dict(cache="static", scheduler="dpm"), r"no static content schedule for dpm/6"),
    (dict(cache="static", cache_threshold=0.2, motion_steps=4), r"no measured motion change for ddim/4"),
])
def test_bad_values_are_one_line_errors_before_any_work(pipe, monkeypatch, kwargs, needle):
    calls = {"text": 0}
    real = pipe.encode_prompt

    def encode(*args):
        calls["text"] += 1
        return real(*args)

    monkeypatch.setattr(pipe, "encode_prompt", encode)
    unet = _spy(monkeypatch, pipe.backend, "unet_step")
    call = dict(CALL, **kwargs)
    with pytest.raises(ValueError, match=needle) as err:
        pipe("a red circle", generator=0, **call)
    assert "\n" not in str(err.value)
    assert calls["text"] == 0 and not unet  # nothing ran


def test_schedules_that_do_not_fit_and_models_without_one(pipe, monkeypatch):
    monkeypatch.setitem(pipe.config.sampling, "cache", cache_entry(content="FRFRF"))
    with pytest.raises(ValueError, match="static content schedule ddim/6: the schedule has 5 steps, the loop 6"):
        pipe("a", **CALL, cache="static")
    monkeypatch.setitem(pipe.config.sampling, "cache", cache_entry(motion="RFFFFF"))
    with pytest.raises(ValueError, match="first step must run the network"):
        pipe("a", **CALL, cache="static")
    monkeypatch.setitem(pipe.config.sampling, "cache", dict(cache_entry(), reuse="guess"))
    with pytest.raises(ValueError, match=r"sampling.cache.reuse must be one of \('reuse', 'extrapolate'\), got 'gue"):
        pipe("a", **CALL, cache="static")
    monkeypatch.delitem(pipe.config.sampling, "cache")
    with pytest.raises(ValueError, match="has no static cache schedule .*calibrate_cache --model DIR"):
        pipe("a", **CALL, cache="static")
    out = pipe("a", generator=0, **CALL, cache="dynamic")  # dynamic needs no calibration (default threshold)
    assert out.evaluations["content"] >= 4


def test_dynamic_is_refused_on_backends_that_run_whole_graphs():
    from engine.backends.base import Backend

    config = load_config(TINY[len("random:"):])
    with pytest.raises(ValueError, match="cache='dynamic' .*backend 'onnxruntime' supports cache='static'"):
        plan_cache(config, "ddim", 4, 4, "dynamic", backend=type("Ort", (Backend,), {"name": "onnxruntime"}))
    from engine.backends import get_backend

    for name in ("cudagraph", "onnxruntime", "tensorrt"):
        assert get_backend(name).cache_modes == ("static",)
    assert get_backend("eager").cache_modes == get_backend("compile").cache_modes == ("static", "dynamic")
    unet = dict(config.content_unet, class_embed_type="timestep")
    config.content_unet = unet
    with pytest.raises(ValueError, match="class_embed_type, which cache='dynamic' does not split"):
        plan_cache(config, "ddim", 4, 4, "dynamic")
    plan_cache(config, "ddim", 4, 4, "dynamic", content=False)  # image-to-video: the UNet does not run


# ------------------------------------------------------------------------------------------ correctness


def test_a_schedule_that_reuses_nothing_gives_the_uncached_video_exactly(pipe, monkeypatch):
    call = dict(CALL, prompt=["a red circle", "a blue square"], negative_prompt="blurry", generator=3)
    ref = pipe(**call)
    assert ref.evaluations == {"content": 2 * 2 * STEPS, "content_first_block": 0,
                               "motion": 2 * 2 * STEPS, "motion_first_block": 0}
    monkeypatch.setitem(pipe.config.sampling, "cache", cache_entry(content="F" * STEPS, motion="F" * STEPS))
    for kwargs in (dict(cache="static"), dict(cache="static", cache_threshold=0.0),
                   dict(cache="dynamic", cache_threshold=0.0), dict(guidance_interval=(0.0, 1.0))):
        out = pipe(**call, **kwargs)
        np.testing.assert_array_equal(out.frames, ref.frames, err_msg=str(kwargs))
        assert torch.equal(out.motion, ref.motion) and out.evaluations == ref.evaluations, kwargs


def test_static_schedule_runs_the_network_only_on_its_full_steps(pipe, monkeypatch):
    unet = _spy(monkeypatch, pipe.backend, "unet_step")
    dit = _spy(monkeypatch, pipe.backend, "dit_step")
    ref = None
    out = pipe(["a red circle", "a blue square"], generator=0, cache="static", **CALL)
    schedule = pipe.config.sampling["cache"]["schedules"]
    assert len(unet) == schedule["content"]["ddim/6"].count("F") == 3
    assert len(dit) == schedule["motion"]["ddim/6"].count("F") == 3
    assert [c[1][0].item() for c in unet] == [pipe._sampler("ddim", STEPS, "content").timestep(i).item()
                                              for i, f in enumerate(schedule["content"]["ddim/6"]) if f == "F"]
    assert out.evaluations == {"content": 3 * 4, "content_first_block": 0, "motion": 3 * 4, "motion_first_block": 0}
    ref = pipe(["a red circle", "a blue square"], generator=0, **CALL)
    assert 0 < np.abs(out.frames - ref.frames).max()  # reuse changed the video, a little on a smooth model
    # A derived schedule: the larger the threshold, the fewer full steps.
    counts = [pipe("a", generator=0, cache="static", cache_threshold=th, **CALL).evaluations["content"]
              for th in (0.0, 0.3, 10.0)]
    assert counts[0] == 2 * STEPS and counts[0] > counts[1] > counts[2] == 2 * 2


def test_guidance_interval_runs_the_conditional_half_alone_outside_it(pipe, monkeypatch):
    unet = _spy(monkeypatch, pipe.backend, "unet_step")
    dit = _spy(monkeypatch, pipe.backend, "dit_step")
    out = pipe(["a red circle", "a blue square"], negative_prompt="blurry", generator=0,
               guidance_interval=(0.3, 0.7), **CALL)
    inside = guidance_steps((0.3, 0.7), STEPS)
    assert inside == (False, False, True, True, True, False)
    assert [c[0].shape[0] for c in unet] == [4 if k else 2 for k in inside]
    assert [c[0].shape[0] for c in dit] == [4 if k else 2 for k in inside]
    prompt_states, pooled = pipe.text_encoder(["a red circle", "a blue square"])
    torch.testing.assert_close(unet[0][2], prompt_states)  # CFG off: the prompts' states, no negative half
    torch.testing.assert_close(dit[0][3], pooled)  # the DiT: the pooled prompts, no null text
    assert out.evaluations["content"] == out.evaluations["motion"] == 2 * (2 * 3 + 3)
    nowhere = pipe("a red circle", generator=0, guidance_interval=(1.0, 1.0), **CALL)
    off = pipe("a red circle", generator=0, guidance_scale=1.0, motion_guidance_scale=1.0, **CALL)
    np.testing.assert_array_equal(nowhere.frames, off.frames)  # an empty interval is guidance off


@pytest.mark.parametrize("kwargs", MODES, ids=MODE_IDS)
def test_same_seed_same_video_and_a_batch_equals_single_runs(pipe, kwargs):
    prompts = ["a red circle moving right", "a green triangle moving up", "a white square"]
    batch = pipe(prompts, negative_prompt="blurry", generator=11, **CALL, **kwargs)
    again = pipe(prompts, negative_prompt="blurry", generator=11, **CALL, **kwargs)
    np.testing.assert_array_equal(batch.frames, again.frames)
    total, content = {k: 0 for k in batch.evaluations}, []
    for i, prompt in enumerate(prompts):
        single = pipe(prompt, negative_prompt="blurry", generator=11 + i, **CALL, **kwargs)
        np.testing.assert_allclose(batch.frames[i], single.frames[0], atol=1e-4)
        torch.testing.assert_close(batch.motion[i], single.motion[0], atol=1e-4, rtol=1e-4)
        for k, v in single.evaluations.items():
            total[k] += v
        content.append(single.evaluations["content"])
    assert batch.evaluations == total  # dynamic: each video's decisions are its own
    if kwargs == dict(cache="dynamic", cache_threshold=0.1):  # the videos' decisions differ (the check can fail)
        assert len(set(content)) > 1 and batch.evaluations["motion_first_block"] > 0, content


@pytest.mark.parametrize("kwargs", MODES, ids=MODE_IDS)
def test_image_to_video_and_motion_variations_work_with_every_mode(pipe, monkeypatch, kwargs):
    cfg = pipe.config
    image = np.random.default_rng(0).random((cfg.height, cfg.width, 3), dtype=np.float32)
    # Image-to-video needs no content schedule: the content model does not run.
    data = cache_entry()
    del data["schedules"]["content"], data["change"]["content"]
    monkeypatch.setitem(pipe.config.sampling, "cache", data)
    unet = _spy(monkeypatch, pipe.backend, "unet_step")
    out = pipe(["moving left", "moving up"], image=image, generator=0, motion_variations=2, **CALL, **kwargs)
    assert not unet and out.evaluations["content"] == 0
    assert out.frames.shape == (4, cfg.num_frames, cfg.height, cfg.width, 3)
    torch.testing.assert_close(out.content[0], torch.from_numpy(image).permute(2, 0, 1) * 2 - 1)
    assert (out.motion[1] - out.motion[0]).abs().max() > 1e-3  # variations differ
    monkeypatch.setitem(pipe.config.sampling, "cache", cache_entry())
    var = pipe("a yellow circle", generator=2, motion_variations=3, **CALL, **kwargs)
    assert var.frames.shape[0] == 3
    torch.testing.assert_close(var.content[1], var.content[0])
    assert (var.motion[2] - var.motion[0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ dynamic mode


@pytest.mark.parametrize("config", ["tiny", "default"])
def test_split_networks_equal_the_whole_networks_exactly(config):
    cfg = load_config(TINY[len("random:"):] if config == "tiny" else "default")
    torch.manual_seed(0)
    model = CMDModel.from_config(cfg).eval()
    wake(model.motion_dit)
    gen = torch.Generator().manual_seed(1)
    text = cfg.text_encoder
    for h, w in ((cfg.height, cfg.width), (cfg.height + 2, cfg.width + 6)):  # an odd size: explicit upsample sizes
        sample = torch.randn(3, cfg.channels, h, w, generator=gen)
        t = torch.tensor([999, 500, 3])
        states = torch.randn(3, text.max_length, text.hidden_size, generator=gen)
        unet = UNetParts(model.content_unet)
        with torch.no_grad():
            ref = model.content_unet(sample, t, encoder_hidden_states=states, return_dict=False)[0]
            head = unet.head(sample, t, states)
            assert torch.equal(unet.tail(*head), ref)
            rows = torch.tensor([2, 0])
            torch.testing.assert_close(unet.tail(*(s.index_select(0, rows) for s in head)), ref[rows],
                                       atol=1e-5, rtol=1e-5)
    motion = torch.randn(3, *cfg.motion_shape(), generator=gen)
    content = torch.randn(3, cfg.channels, cfg.height, cfg.width, generator=gen)
    pooled = torch.randn(3, text.hidden_size, generator=gen)
    dit = DiTParts(model.motion_dit)
    with torch.no_grad():
        ref = model.motion_dit(motion, t, content, pooled)
        x1, r1, c = dit.head(motion, t, content, pooled)
        assert torch.equal(dit.final(dit.tail(x1, c), c, tuple(motion.shape)), ref)
        x0, _, _ = model.motion_dit.embed(motion, t, content, pooled)
        assert torch.equal(r1, x1 - x0)


class _FakeParts:
    """Parts whose first-block output we choose: video 0 changes by 1% a step, video 1 by 50%."""

    def __init__(self):
        self.tails = []

    def head(self, batch, t, cond):
        step = int(t[0])
        scale = torch.tensor([1.0 + 0.01 * step, 1.5 ** step])[:, None]
        indicator = torch.cat([scale, scale])[: batch.shape[0]] * torch.ones(batch.shape[0], 4)
        return (indicator, batch)

    def tail(self, indicator, batch):
        self.tails.append(batch.shape[0])
        return batch * 10.0


def test_dynamic_decisions_are_per_video():
    parts = _FakeParts()
    plan = StagePlan((True,) * 5, (True,) * 5, "reuse", threshold=0.1)
    counts = Evaluations()
    step = DynamicStep("unet", parts, plan, videos=2, guidance=2.0, evaluations=counts)
    outs = []
    for i in range(5):
        x = torch.full((2, 4), float(i + 1))
        batch = torch.cat([x, x])
        outs.append(step(i, batch, torch.full((4,), i), None))
    # step 0 runs both; video 0 (1% a step, < 10% since its last run) skips steps 1-3; the last step runs both.
    assert parts.tails == [4, 2, 2, 2, 4]
    assert counts.full == 4 + 2 + 2 + 2 + 4 and counts.first_block == 2 + 2 + 2
    for i in (1, 2, 3):
        torch.testing.assert_close(outs[i][0], outs[0][0])  # video 0 reused its output of step 0
        torch.testing.assert_close(outs[i][1], torch.full((4,), 10.0 * (i + 1)))  # video 1 ran (guided: 10x)
    torch.testing.assert_close(outs[4], torch.full((2, 4), 50.0))


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_dynamic_mode_on_the_eager_backends(backend):
    """Compile runs the same pieces compiled (a micro model: inductor's C++ build dominates the cost)."""
    from engine.random_text import RandomTextEncoder

    cfg = load_config(TINY[len("random:"):])
    cfg.content_unet.update(down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
                            block_out_channels=[16], mid_block_type=None)
    cfg.motion_dit.depth = 2
    torch.manual_seed(0)
    model = CMDModel.from_config(cfg)
    wake(model.motion_dit)
    pipe = CMDPipeline(model, RandomTextEncoder(cfg.text_encoder.hidden_size, cfg.text_encoder.max_length))
    call = dict(CALL, prompt=["a red circle", "a blue square"], generator=5, cache="dynamic", cache_threshold=0.5)
    ref = pipe(**call)
    assert ref.evaluations["content_first_block"] + ref.evaluations["motion_first_block"] > 0
    if backend == "eager":
        return
    torch._dynamo.reset()
    pipe.set_backend("compile")
    out = pipe(**call)
    assert out.evaluations == ref.evaluations
    mse = float(np.mean((out.frames.astype(np.float64) - ref.frames) ** 2))
    assert mse < 1e-8, mse


# ------------------------------------------------------------------------------------------ calibration, CLI, bench


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    p = CMDPipeline.from_pretrained(TINY)
    wake(p.model.motion_dit)
    path = str(tmp_path_factory.mktemp("models") / "tiny")
    p.model.save_pretrained(path)
    return path


def _config_json(folder):
    import json

    with open(os.path.join(folder, "cmd_config.json")) as f:
        return json.load(f)


def _copy_model(model_dir, folder, sizes=None):
    """A copy of the model folder; ``sizes``: the copy serves only these (its config's ``sizes``)."""
    import json
    import shutil

    shutil.copytree(model_dir, folder)
    if sizes is not None:
        config = _config_json(folder)
        config["sizes"] = sizes
        with open(os.path.join(folder, "cmd_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return folder


def test_calibrate_measures_the_change_and_writes_schedules_the_pipeline_runs(model_dir, tmp_path, capsys):
    """A model that serves one size: measured there alone, as before sizes were calibrated."""
    from engine.cache import guide, relative_change
    from engine.calibrate_cache import main as calibrate

    folder = _copy_model(model_dir, str(tmp_path / "model"), sizes=["4x16x16"])
    prompts = ["a red circle moving right", "a blue square moving up", "a white triangle"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    before = _config_json(folder)
    argv = ["--model", folder, "--prompts-file", str(tmp_path / "prompts.txt"), "--steps", "5", "--motion-steps", "4",
            "--threshold", "0.5", "--batch-size", "2", "--seed", "3"]
    assert calibrate(argv) == 0
    out = capsys.readouterr().out
    assert "content ddim/5: F" in out and "wrote sampling.cache" in out
    after = _config_json(folder)
    data = after["sampling"].pop("cache")
    assert after == before  # nothing else in the config changed
    change = data["change"]["content"]["ddim/5"]
    assert len(change) == 4 and len(data["change"]["motion"]["ddim/4"]) == 3
    assert data["schedules"]["content"]["ddim/5"] == schedule_from_change(change, 0.5)
    assert data["threshold"] == 0.5 and data["calibration"]["prompts"] == prompts
    assert data["calibration"]["sizes"] == ["4x16x16"]
    assert data["change_by_size"] == {"content": {"ddim/5": {"4x16x16": change}},
                                      "motion": {"ddim/4": {"4x16x16": data["change"]["motion"]["ddim/4"]}}}

    # The measured change is the guided output's, recomputed here from the UNet's raw outputs.
    pipe = CMDPipeline.from_pretrained(folder)
    outputs = []
    real = pipe.backend.unet_step
    pipe.backend.unet_step = lambda *a: outputs.append(real(*a).clone()) or outputs[-1]
    sums = np.zeros(4)
    for start in (0, 2):
        outputs.clear()
        pipe(prompts[start:start + 2], generator=3 + start, num_inference_steps=5, motion_steps=4, progress=False)
        g = pipe.config.sampling["guidance"]
        guided = [guide(o, len(prompts[start:start + 2]), True, g) for o in outputs]
        sums += [float(relative_change(guided[i], guided[i - 1]).sum()) for i in range(1, 5)]
    np.testing.assert_allclose(change, sums / 3, atol=2e-6)
    del pipe.backend.unet_step

    # The folder loads and runs its schedule; a second calibration adds its step counts, keeps the first.
    schedule = data["schedules"]["content"]["ddim/5"]
    run = pipe("a", generator=0, cache="static", num_inference_steps=5, motion_steps=4, progress=False)
    assert run.evaluations["content"] == 2 * schedule.count("F")
    assert calibrate(["--model", folder, "--steps", "3", "--motion-steps", "3", "--batch-size", "3"]) == 0
    data = _config_json(folder)["sampling"]["cache"]
    assert sorted(data["schedules"]["content"]) == ["ddim/3", "ddim/5"]
    assert data["calibration"]["prompts"] == prompts  # the last calibration's prompts by default
    assert data["threshold"] == 0.5  # and its threshold
    capsys.readouterr()

    # Dry runs and bad values write nothing.
    text = open(os.path.join(folder, "cmd_config.json")).read()
    assert calibrate(["--model", folder, "--steps", "2", "--motion-steps", "2", "--dry-run"]) == 0
    for bad, needle in ((["--threshold", "-1"], "--threshold must be a finite number >= 0, got -1"),
                        (["--steps", "0"], "--steps must be a whole number >= 1, got 0"),
                        (["--steps", "5000"], "num_inference_steps must be a whole number between 1 and 1000"),
                        (["--scheduler", "euler"], "unknown scheduler 'euler'"),
                        (["--prompts-file", str(tmp_path / "none.txt")], "none.txt")):
        assert calibrate(["--model", folder, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert calibrate(["--model", TINY]) == 2
    assert "random weights have no folder" in capsys.readouterr().err
    assert open(os.path.join(folder, "cmd_config.json")).read() == text
    assert sorted(os.listdir(folder)) == sorted(os.listdir(model_dir))  # no temporary file left


def test_calibrate_takes_the_largest_change_over_every_served_size(model_dir, tmp_path, capsys, monkeypatch):
    """The tiny model serves 4x16x16, 2x16x16 and 4x16x32: each one's change is measured and recorded, and the
    schedule comes from their elementwise maximum (a step is reused only where every size allows it)."""
    import json

    from engine.calibrate_cache import calibrate as calibrate_data
    from engine.calibrate_cache import main as calibrate
    from engine.calibrate_cache import measure_change

    served = ["4x16x16", "2x16x16", "4x16x32"]
    folder = _copy_model(model_dir, str(tmp_path / "model"))
    prompts = ["a red circle moving right", "a blue square moving up", "a white triangle"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    argv = ["--model", folder, "--prompts-file", str(tmp_path / "prompts.txt"), "--steps", "5", "--motion-steps", "4",
            "--threshold", "0.3", "--batch-size", "2", "--seed", "1"]
    assert calibrate(argv) == 0
    assert f"measured at {', '.join(served)}" in capsys.readouterr().out
    text = open(os.path.join(folder, "cmd_config.json")).read()
    data = json.loads(text)["sampling"]["cache"]
    assert data["calibration"]["sizes"] == served

    pipe = CMDPipeline.from_pretrained(folder)
    alone = {size: measure_change(pipe, prompts, 1, "ddim", 5, 4, 2, size=size) for size in served}
    for stage, key in (("content", "ddim/5"), ("motion", "ddim/4")):
        by_size = data["change_by_size"][stage][key]
        assert list(by_size) == served
        for size in served:
            np.testing.assert_allclose(by_size[size], alone[size][stage], atol=2e-6)
            assert f'"{size}": {json.dumps(by_size[size])}' in text  # one line per size: readable
        largest = np.max([alone[size][stage] for size in served], axis=0)
        own = np.array(alone["4x16x16"][stage])
        assert np.any(largest > own + 1e-4), (stage, alone)  # another size than the own one raises the change
        np.testing.assert_allclose(data["change"][stage][key], largest, atol=2e-6)
        assert data["schedules"][stage][key] == schedule_from_change(data["change"][stage][key], 0.3)
    # cache_threshold=T re-derives from the maximum.
    pipe = CMDPipeline.from_pretrained(folder)
    out = pipe("a", generator=0, cache="static", cache_threshold=0.6, num_inference_steps=5, motion_steps=4,
               progress=False)
    assert out.evaluations["motion"] == 2 * schedule_from_change(data["change"]["motion"]["ddim/4"], 0.6).count("F")

    # --sizes: some of the served sizes; the other step counts' entries are kept.
    assert calibrate(["--model", folder, "--steps", "3", "--motion-steps", "3", "--sizes", "4x16x32, 2x16x16"]) == 0
    data = _config_json(folder)["sampling"]["cache"]
    assert data["calibration"]["sizes"] == ["4x16x32", "2x16x16"]
    assert list(data["change_by_size"]["motion"]["ddim/3"]) == ["4x16x32", "2x16x16"]
    assert list(data["change_by_size"]["motion"]["ddim/4"]) == served
    capsys.readouterr()

    # A size the model does not serve, or not a size: one line, before any work, nothing written.
    text = open(os.path.join(folder, "cmd_config.json")).read()
    monkeypatch.setattr(CMDPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    for bad, needle in (("4x16x16,4x32x32", "size 4x32x32 is not one model 'tiny-test' serves "
                                             "(4x16x16, 2x16x16, 4x16x32)"),
                        ("8x16x16", "size 8x16x16 is not one model"),
                        ("4x16", "a clip size is FRAMESxHEIGHTxWIDTH, e.g. 16x32x32, got '4x16'")):
        assert calibrate(["--model", folder, "--sizes", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert open(os.path.join(folder, "cmd_config.json")).read() == text
    assert sorted(os.listdir(folder)) == sorted(os.listdir(model_dir))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="size 4x32x32 is not one model"):
        calibrate_data(pipe, prompts, sizes=["4x32x32"])
    with pytest.raises(ValueError, match="size 4x32x32 is not one model"):
        measure_change(pipe, prompts, size="4x32x32")


def test_cli_flags_reach_the_pipeline_and_bad_ones_exit_2(model_dir, tmp_path, capsys):
    from engine.run import main as run_main

    base = ["--prompt", "a red circle", "--model", model_dir, "--steps", "4", "--motion-steps", "4", "--quiet"]
    out = str(tmp_path / "a.npy")
    assert run_main([*base, "--out", out, "--cache", "dynamic", "--cache-threshold", "0.5",
                     "--guidance-interval", "0.25", "0.75"]) == 0
    pipe = CMDPipeline.from_pretrained(model_dir)
    ref = pipe("a red circle", generator=0, num_inference_steps=4, motion_steps=4, progress=False, cache="dynamic",
               cache_threshold=0.5, guidance_interval=(0.25, 0.75))
    np.testing.assert_array_equal(np.load(out), np.round(ref.frames[0] * 255).astype(np.uint8))
    capsys.readouterr()
    for bad, needle in ((["--cache", "fast"], "invalid choice: 'fast'"),
                        (["--cache-threshold", "0.1"], "cache_threshold=0.1 needs cache='static' or 'dynamic'"),
                        (["--cache", "dynamic", "--cache-threshold", "-1"], "--cache-threshold must be a finite number"),
                        (["--cache", "static"], "has no static cache schedule"),
                        (["--guidance-interval", "0.8", "0.2"], "guidance_interval is reversed"),
                        (["--guidance-interval", "0.5", "2"], "--guidance-interval must be a finite number between 0 and 1, got 2"),
                        (["--guidance-interval", "0.5"], "expected 2 arguments"),
                        (["--cache", "dynamic", "--backend", "onnxruntime"], "supports cache='static'")):
        target = str(tmp_path / "bad.npy")
        assert run_main([*base, "--out", target, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, (bad, err)
        assert not os.path.exists(target)
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]


def test_bench_cache_compares_settings_side_by_side(capsys):
    import json

    from engine import bench

    argv = ["cache", "--model", TINY, "--steps", "4", "--motion-steps", "4", "--num-prompts", "3", "--batch", "2",
            "--settings", "none,dynamic:0.5,none@0.5-1", "--flops-config", TINY[len("random:"):], "--json"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    none, dyn, interval = (report["settings"][k] for k in ("none", "dynamic:0.5", "none@0.5-1"))
    assert none["evaluations_per_video"]["full_total"] == 2 * 4 * 2
    assert none["fewer_evaluations"] == 1.0 and none["psnr_db"] is None and none["ssim"] == pytest.approx(1.0)
    assert interval["evaluations_per_video"]["content"] == 2 * 2 + 2 * 1  # CFG on steps 2 and 3 of 4
    assert interval["fewer_evaluations"] == pytest.approx(16 / 12)
    assert interval["psnr_db"] < 100 and interval["kwargs"] == {"guidance_interval": [0.5, 1.0]}
    assert dyn["evaluations_per_video"]["full_total"] < 16 and dyn["speedup"] > 0
    flops = report["flops"]["settings"]
    assert flops["none"]["flops_saved"] == 0 and 0 < flops["none@0.5-1"]["flops_saved"] < 1
    assert flops["dynamic:0.5"]["tflops_per_video"] < flops["none"]["tflops_per_video"]
    assert report["shape"]["videos"] == 3 and "dynamic:0.5" in out
    for bad, needle in (("static", "has no static cache schedule"), ("fast", "mode must be none, static or dynamic"),
                        ("dynamic:-1", "cache_threshold must be a finite number >= 0"),
                        ("none@0.9-0.1", "guidance_interval is reversed")):
        assert bench.main(["cache", "--model", TINY, "--settings", f"none,{bad}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err, err
    for backend, needle in (("onnxruntime", "backend 'onnxruntime' supports cache='static'"),
                            ("eager,compile", "--backend takes one backend")):
        assert bench.main(["cache", "--model", TINY, "--settings", "none,dynamic", "--backend", backend]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err, err


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cudagraph_static_schedule_and_guidance_interval_never_sync_with_the_host():
    pipe = CMDPipeline.from_pretrained(TINY, device="cuda", backend="cudagraph")
    wake(pipe.model.motion_dit)
    pipe.config.sampling["cache"] = cache_entry()
    plan = plan_cache(pipe.config, "ddim", STEPS, STEPS, "static", guidance_interval=(0.2, 0.8), backend=pipe.backend)
    assert not all(plan.content.compute) and not all(plan.content.cfg)
    states, pooled, negative = pipe.encode_prompt(["a red circle"], [""])
    gen = torch.Generator(device="cuda").manual_seed(0)
    content_noise = torch.randn(1, 3, 16, 16, device="cuda", generator=gen)
    motion_noise = torch.randn(1, *pipe.config.motion_shape(), device="cuda", generator=gen)

    def loops():
        counts = Evaluations()
        content = pipe.generate_content(states, negative, content_noise, STEPS, 3.0, "ddim", cache=plan.content,
                                        evaluations=counts)
        return pipe.generate_motion(content, pooled, motion_noise, STEPS, 2.0, "ddim", cache=plan.motion), counts

    expected, counts = loops()  # captures the graphs (batch 1 and 2) and builds the scheduler tables
    assert counts.full == sum((2 if c else 1) for f, c in zip(plan.content.compute, plan.content.cfg) if f)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode is live: a sync would raise
            torch.ones(1, device="cuda").item()
        motion, _ = loops()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(motion, expected)
    pipe.set_backend("eager")
    eager, _ = loops()
    torch.testing.assert_close(motion, eager, atol=1e-3, rtol=1e-3)
