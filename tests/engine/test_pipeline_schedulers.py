"""The device-table schedulers (what the cudagraph backend runs) against diffusers' own step."""

import pytest
import torch

from engine.configs import SchedulerConfig
from engine.schedulers import DeviceSampler, DiffusersSampler, make_sampler


def _run(sampler, x, weight, steps):
    """A toy denoiser that depends on x non-linearly, so each step's input matters."""
    for i in range(steps):
        out = torch.tanh(torch.einsum("bchw,cd->bdhw", x, weight)) + 0.1 * x
        x = sampler.step(i, out, x)
    return x


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 7, 25])
@pytest.mark.parametrize("clip", [False, True])
def test_device_tables_match_diffusers(kind, prediction, steps, clip):
    cfg = SchedulerConfig(prediction_type=prediction, beta_schedule="scaled_linear" if steps == 7 else "linear")
    ref = DiffusersSampler(kind, cfg, steps, "cpu", clip_sample=clip)
    dev = DeviceSampler(kind, cfg, steps, "cpu", clip_sample=clip)
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
