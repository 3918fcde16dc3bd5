"""The schedulers: diffusers' step (eager loop) and the device tables (cudagraph, TensorRT) against each other,
against a perfect model, and against diffusers' own DDIM where that one is right."""

import pytest
import torch

from engine.configs import SchedulerConfig, load_config
from engine.schedulers import (SCHEDULERS, TIMESTEP_SPACINGS, DeviceSampler, DiffusersSampler, build_scheduler,
                               make_sampler)


def _run(sampler, x, weight, steps):
    """A toy denoiser that depends on x non-linearly, so each step's input matters."""
    for i in range(steps):
        out = torch.tanh(torch.einsum("bchw,cd->bdhw", x, weight)) + 0.1 * x
        x = sampler.step(i, out, x)
    return x


@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 7, 25])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_device_tables_match_diffusers(kind, prediction, steps, clip, spacing):
    cfg = SchedulerConfig(prediction_type=prediction, beta_schedule="scaled_linear" if steps == 7 else "linear")
    ref = DiffusersSampler(kind, cfg, steps, "cpu", clip_sample=clip, timestep_spacing=spacing)
    dev = DeviceSampler(kind, cfg, steps, "cpu", clip_sample=clip, timestep_spacing=spacing)
    assert torch.equal(ref.timesteps_device, dev.timesteps_device)
    gen = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    weight = torch.randn(3, 3, generator=gen)
    a, b = _run(ref, x.clone(), weight, steps), _run(dev, x.clone(), weight, steps)
    assert ((a - b).norm() / a.norm()).item() < 2e-6


def test_trailing_spacing_starts_at_the_last_training_step_and_tables_are_cached():
    cfg = SchedulerConfig()
    a = make_sampler("ddim", cfg, 4, "cpu", on_device=True)
    b = make_sampler("ddim", cfg, 4, "cpu", on_device=True)
    assert a.timesteps_device.tolist() == [999, 749, 499, 249]
    assert a.timesteps_device is b.timesteps_device  # one table per (scheduler, steps, device)
    with pytest.raises(ValueError, match="'euler'"):
        make_sampler("euler", cfg, 4, "cpu", on_device=False)
    with pytest.raises(ValueError, match="'middle'"):
        make_sampler("ddim", cfg, 4, "cpu", on_device=False, timestep_spacing="middle")


# ----------------------------------------------------------------------------------------------- perfect model
# The (prediction, betas) pairs of the configs we ship, each with and without the x0 clip.
_SCHEDULES = [dict(prediction_type="v_prediction"),  # default
              dict(prediction_type="epsilon"),  # ucf101-64, the SD motion DiT
              dict(prediction_type="epsilon", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # SD
              dict(prediction_type="sample")]
VARIANTS = [(SchedulerConfig(**s), clip) for s in _SCHEDULES for clip in (False, True)]


def _alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """The training schedule, computed here in float64 from its definition (not read from diffusers)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    else:  # scaled_linear
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def perfect_run(sampler, cfg: SchedulerConfig, x0: torch.Tensor, noise: torch.Tensor):
    """Sample from ``noise`` with a network that returns the exact epsilon / v / x0 of the clean sample ``x0``
    for the sample it is given (computed in float64, returned in float32 as a network would).

    Returns (final sample, fp32 floor): the floor is what one rounding of the last step's fp32 inputs costs once
    amplified into x0 (epsilon prediction at t = 999 of linear betas multiplies by 1 / sqrt(alpha_bar) = 157:
    a one-step run cannot get closer than ~4e-5 in fp32, diffusers' own DDIM neither)."""
    ac = _alphas_cumprod(cfg).to(x0.device)
    x, floor = noise, 0.0
    for i in range(len(sampler)):
        t = int(sampler.timestep(i))
        sa, sb = ac[t].sqrt(), (1 - ac[t]).sqrt()
        eps = (x.double() - sa * x0.double()) / sb
        out = {"epsilon": eps, "v_prediction": sa * eps - sb * x0.double(), "sample": x0.double()}[cfg.prediction_type]
        out = out.float()
        p, q = {"epsilon": (1 / sa, sb / sa), "v_prediction": (sa, sb), "sample": (0.0, 1.0)}[cfg.prediction_type]
        floor = 2.0 ** -23 * float(p * x.abs().max() + q * out.abs().max())
        x = sampler.step(i, out, x)
    return x, floor


def _check_perfect_model(cls, kind: str, spacing: str, device, variants, steps=range(1, 51)):
    worst = []
    for n in steps:
        for cfg, clip in variants(n):
            gen = torch.Generator().manual_seed(1000 * n + clip)
            x0 = (torch.rand(2, 3, 5, 4, generator=gen) * 2 - 1).to(device)  # bounded data, so clipping is legal
            noise = torch.randn(2, 3, 5, 4, generator=gen).to(device)
            sampler = cls(kind, cfg, n, device, clip_sample=clip, timestep_spacing=spacing)
            assert len(sampler) == n
            final, floor = perfect_run(sampler, cfg, x0, noise)
            err = (final - x0).abs().max().item()
            if not err <= 1e-5 + floor:
                worst.append(f"{n} steps, {cfg.prediction_type}/{cfg.beta_schedule}, clip={clip}: {err:.2e}")
    assert not worst, f"{kind} ({spacing}) on {cls.__name__} stops short of the clean sample: " + "; ".join(worst)


@pytest.mark.parametrize("cls", [DiffusersSampler, DeviceSampler], ids=["eager", "device-tables"])
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("kind", SCHEDULERS)
def test_a_perfect_model_ends_at_the_clean_sample(cls, spacing, kind):
    """Every scheduler, spacing and step count 1..50 (issue 13.1: DDIM "trailing" at 7 steps stopped at t = 0,
    error 3e-2). The (prediction, betas, clip) variant cycles with the step count, so each meets step counts that
    divide 1000 and ones that do not; the device tables run every variant at every step count below."""
    _check_perfect_model(cls, kind, spacing, "cpu", lambda n: [VARIANTS[n % len(VARIANTS)]])


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_device_tables_reach_the_clean_sample_for_every_variant(kind):
    for spacing in TIMESTEP_SPACINGS:
        _check_perfect_model(DeviceSampler, kind, spacing, "cpu", lambda n: VARIANTS)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", SCHEDULERS)
def test_device_tables_on_cuda_reach_the_clean_sample(kind):
    for spacing in TIMESTEP_SPACINGS:
        _check_perfect_model(DeviceSampler, kind, spacing, "cuda", lambda n: VARIANTS)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_device_tables_on_cuda_match_diffusers(kind, spacing):
    for cfg, clip in VARIANTS:
        for steps in (1, 2, 7, 25, 48):
            ref = DiffusersSampler(kind, cfg, steps, "cpu", clip_sample=clip, timestep_spacing=spacing)
            dev = DeviceSampler(kind, cfg, steps, "cuda", clip_sample=clip, timestep_spacing=spacing)
            gen = torch.Generator().manual_seed(steps)
            x = torch.randn(2, 3, 8, 8, generator=gen)
            weight = torch.randn(3, 3, generator=gen)
            a = _run(ref, x.clone(), weight, steps)
            b = _run(dev, x.cuda(), weight.cuda(), steps).cpu()
            assert ((a - b).norm() / a.norm()).item() < 1e-5, (cfg, clip, steps)


def test_ddim_is_diffusers_ddim_where_that_one_is_right():
    """"ddim" is DPM-Solver++ of order 1; at step counts that divide 1000, where diffusers' DDIMScheduler
    steps to the right timesteps, the two give the same samples (no clip: diffusers' DDIM clips differently)."""
    from diffusers import DDIMScheduler

    for prediction in ("epsilon", "v_prediction"):
        cfg = SchedulerConfig(prediction_type=prediction)
        for steps in (4, 10, 25):
            ours = DiffusersSampler("ddim", cfg, steps, "cpu", clip_sample=False)
            ref = DDIMScheduler(num_train_timesteps=1000, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                beta_schedule="linear", prediction_type=prediction, timestep_spacing="trailing",
                                set_alpha_to_one=True, steps_offset=0, clip_sample=False)
            ref.set_timesteps(steps)
            assert ours.scheduler.timesteps.tolist() == ref.timesteps.tolist()
            gen = torch.Generator().manual_seed(steps)
            x = torch.randn(2, 3, 8, 8, generator=gen)
            weight = torch.randn(3, 3, generator=gen)
            a = _run(ours, x.clone(), weight, steps)
            b = x.clone()
            for t in ref.timesteps:
                out = torch.tanh(torch.einsum("bchw,cd->bdhw", b, weight)) + 0.1 * b
                b = ref.step(out, t, b, return_dict=False)[0]
            assert ((a - b).norm() / b.norm()).item() < 1e-5, (prediction, steps)


@pytest.mark.parametrize("path", [DiffusersSampler, DeviceSampler], ids=["eager", "device-tables"])
@pytest.mark.parametrize("kind", SCHEDULERS)
def test_clip_sample_bounds_every_x0_prediction(path, kind):
    """A model that predicts far outside [-1, 1]: with clip_sample every step's x0 and the final sample stay
    in [-1, 1]; without it they do not."""
    cfg = SchedulerConfig(prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    for clip in (True, False):
        sampler = path(kind, cfg, 9, "cpu", clip_sample=clip)
        y = x.clone()
        for i in range(len(sampler)):
            out = -3.0 * torch.sign(y) - y  # v pointing away from the data range
            y = sampler.step(i, out, y)
        assert (y.abs().max().item() <= 1.0) == clip, (clip, y.abs().max().item())


def test_the_config_says_where_data_is_bounded(tmp_path):
    """Pixel content and the tanh motion latent are bounded; SD latents are not. Configs written before the key
    existed get the rule the samplers used then."""
    assert load_config("default").content_scheduler.clip_sample and load_config("default").motion_scheduler.clip_sample
    sd = load_config("sd21-512x1024")
    assert not sd.content_scheduler.clip_sample and sd.motion_scheduler.clip_sample
    assert build_scheduler("dpm", sd.motion_scheduler).config.thresholding
    assert not build_scheduler("dpm", sd.content_scheduler).config.thresholding
    import json

    data = sd.to_dict()
    for key in ("content_scheduler", "motion_scheduler"):
        del data[key]["clip_sample"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    legacy = load_config(str(old))
    assert (legacy.content_scheduler.clip_sample, legacy.motion_scheduler.clip_sample) == (False, True)


@pytest.mark.gpu
def test_default_model_on_cuda_graphs_stays_in_range():
    """The shipped model with its scheduler as device tables on CUDA (cudagraph backend), DPM-Solver++ at 25 steps:
    content frame and motion latent within [-1, 1]. (A random-weight text encoder: the GPU machines lack MiniLM.)"""
    from engine.pipeline import CMDPipeline
    from engine.random_text import RandomTextEncoder

    cfg = load_config("default")
    pipe = CMDPipeline.from_pretrained("default", device="cuda", backend="cudagraph",
                                       text_encoder=RandomTextEncoder(cfg.text_encoder.hidden_size,
                                                                      cfg.text_encoder.max_length))
    assert pipe.backend.device_scheduler
    out = pipe([f"a red circle moving {d}" for d in ("left", "right", "up", "down")], scheduler="dpm",
               num_inference_steps=25, motion_steps=25, generator=0, output_type="latent", progress=False)
    assert out.content.abs().max().item() <= 1.0 and out.motion.abs().max().item() <= 1.0
