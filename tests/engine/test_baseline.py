"""engine.baseline (the ModelScope UNet3D and its DDIM CFG loop) and benchmarks/paper_scale.py, whose
GPU run is proven end to end here on a CPU with tiny networks."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.baseline import (MODELSCOPE_UNET3D_CONFIG, build_baseline_scheduler, build_baseline_unet,
                             sample_baseline)
from engine.configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"block_out_channels": (16, 32), "down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"),
        "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D"), "layers_per_block": 1, "norm_num_groups": 8,
        "attention_head_dim": 2, "cross_attention_dim": 16}


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_baseline_unet(in_channels=4, **TINY).eval()


def test_modelscope_unet_has_its_released_size():
    """damo-vilab/text-to-video-ms-1.7b's UNet: 1.41B parameters (2.82 GB of fp16 weights); the rest of
    the '1.7B' is the OpenCLIP text encoder and the VAE."""
    unet = build_baseline_unet(device="meta")
    params = sum(p.numel() for p in unet.parameters())
    assert abs(params / 1.411e9 - 1) < 0.01, params
    assert unet.config.cross_attention_dim == MODELSCOPE_UNET3D_CONFIG["cross_attention_dim"] == 1024
    with torch.device("meta"):
        out = unet(torch.empty(1, 4, 16, 64, 128), torch.zeros(1), encoder_hidden_states=torch.empty(1, 77, 1024))
    assert out.sample.shape == (1, 4, 16, 64, 128)


def test_sampling_shape_determinism_and_one_cfg_batch_per_step(tiny_unet):
    batch, frames, h, w, steps = 2, 3, 8, 8, 3
    text, null = torch.randn(batch, 5, 16), torch.randn(1, 5, 16)
    calls = []
    hook = tiny_unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        a = sample_baseline(tiny_unet, text, null, frames, h, w, steps=steps, guidance_scale=5.0,
                            generator=torch.Generator().manual_seed(1))
    finally:
        hook.remove()
    assert a.shape == (batch, frames, 4, h, w) and torch.isfinite(a).all()
    assert calls == [2 * batch] * steps  # one UNet call per step, on [uncond; cond]
    b = sample_baseline(tiny_unet, text, null, frames, h, w, steps=steps, guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    unguided = sample_baseline(tiny_unet, text, None, frames, h, w, steps=steps,
                               generator=torch.Generator().manual_seed(1))
    assert (a - unguided).abs().max() > 1e-4  # guidance changes the result


def test_guidance_is_uncond_plus_scale_times_difference(tiny_unet):
    """One DDIM step by hand: eps = eps(null) + s * (eps(text) - eps(null)), then the scheduler's update."""
    text, null, s = torch.randn(1, 5, 16), torch.randn(1, 5, 16), 6.0
    out = sample_baseline(tiny_unet, text, null, 2, 8, 8, steps=1, guidance_scale=s,
                          generator=torch.Generator().manual_seed(3))
    noise = torch.randn((1, 4, 2, 8, 8), generator=torch.Generator().manual_seed(3))
    sched = build_baseline_scheduler()
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    with torch.no_grad():
        cond = tiny_unet(noise, t, encoder_hidden_states=text).sample
        uncond = tiny_unet(noise, t, encoder_hidden_states=null).sample
    expected = sched.step(uncond + s * (cond - uncond), t, noise).prev_sample.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, bad", [({"steps": 0}, "0"), ({"height": 7}, "7x8"), ({"num_frames": 0}, "0")])
def test_bad_sampling_arguments_name_the_value(tiny_unet, kwargs, bad):
    args = {"num_frames": 2, "height": 8, "width": 8, "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=bad):
        sample_baseline(tiny_unet, torch.randn(1, 5, 16), None, **args)
    with pytest.raises(ValueError, match="text_states"):
        sample_baseline(tiny_unet, torch.randn(1, 5, 7), None, 2, 8, 8)
    with pytest.raises(ValueError, match="nope"):
        build_baseline_unet(device="meta", nope=1)


def test_paper_scale_benchmark_runs_end_to_end_on_cpu(tmp_path):
    """The GPU benchmark's whole path on a CPU: a tiny 8x16x16 config, 1 step, eager, a narrow baseline."""
    cfg = load_config("default").to_dict()
    cfg.update(name="smoke", num_frames=8, height=16, width=16, sizes=["8x16x16"])
    cfg["content_unet"]["sample_size"] = 16
    config = tmp_path / "smoke.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / "results"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "paper_scale.py"), "--config", str(config),
           "--steps", "1", "--device", "cpu", "--dtype", "float32", "--backends", "eager,cudagraph",
           "--batch-sizes", "1,2", "--frames", "8", "--baseline-size", "tiny", "--repeats", "1", "--warmup", "0",
           "--out", str(out), "--name", "smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend 'cudagraph' needs CUDA" in proc.stdout
    report = json.loads((out / "smoke.json").read_text())
    assert [(r["backend"], r["batch"]) for r in report["runs"]] == [("eager", 1), ("eager", 2)]
    assert [r["frames"] for r in report["scaling"]] == [8]
    for r in report["runs"] + report["scaling"]:
        assert r["latency_s"] > 0 and set(r["stages_s"]) == {"text", "content", "motion", "decode"}
    assert report["baseline"]["size"] == "tiny" and report["baseline"]["runs"][0]["latency_s"] > 0
    assert report["speedup"]["vs_eager"] == 1.0 and report["speedup"]["vs_baseline"] > 0
    assert report["flops"]["full"]["cmd"]["total"] > report["flops"]["paper"]["cmd"]["total"] > 0
    assert report["params"]["motion_dit"] > 0 and report["targets"] is None  # targets are for CUDA runs
    assert report["environment"]["torch"] == torch.__version__
    table = (out / "smoke.md").read_text()
    assert "| CMD eager | 1 |" in table and "Frame scaling" in table
    png = out / "smoke.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout and not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["json"] == str(out / "smoke.json")


def test_paper_scale_bad_input_is_one_line(capsys):
    spec = importlib.util.spec_from_file_location("paper_scale", os.path.join(ROOT, "benchmarks", "paper_scale.py"))
    paper_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper_scale)
    for argv, bad in ((["--batch-sizes", "1,x"], "1,x"), (["--steps", "0"], "0")):
        with pytest.raises(SystemExit) as exit_info:
            paper_scale.parse_args(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.strip().count("\n") == 0 and bad in err, err
    for argv, bad in ((["--device", "tpu"], "tpu"), (["--device", "cpu", "--config", "default", "--frames", "7"], "7"),
                      (["--device", "cpu", "--backends", "tensorrt"], "tensorrt")):
        with pytest.raises(SystemExit) as exit_info:
            paper_scale.run_benchmark(paper_scale.parse_args(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.strip().count("\n") == 0 and bad in err, err
