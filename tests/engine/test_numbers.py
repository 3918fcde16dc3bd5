"""Every number a request or a command line takes is range-checked before any work (engine.cli's rules):
seeds a torch generator takes (the seeds derived from one too), counts >= 1, finite floats; one line, exit 2,
no model loaded, no file written."""

import importlib
import math

import numpy as np
import pytest
import torch

from engine import cli
from engine.cli import SEED_MAX, SEED_MIN, check_int, check_number, check_seed

TOO_BIG = str(2 ** 64)  # the seed: one past what torch.Generator().manual_seed takes


def test_seed_range_is_what_a_torch_generator_takes():
    for seed in (SEED_MIN, -1, 0, SEED_MAX):
        torch.Generator().manual_seed(check_seed("seed", seed))
    for seed in (SEED_MIN - 1, SEED_MAX + 1):
        with pytest.raises(ValueError):
            torch.Generator().manual_seed(seed)  # torch's own refusal, after the work has begun
        with pytest.raises(ValueError, match=f"seed must be a whole number between .*, got {seed}$"):
            check_seed("seed", seed)


def test_derived_seeds_must_fit_too():
    assert check_seed("--seed", SEED_MAX - 2, count=3) == SEED_MAX - 2
    with pytest.raises(ValueError, match=r"--seed \+ 0 \.\. 3\), got"):
        check_seed("--seed", SEED_MAX - 2, count=4)
    with pytest.raises(ValueError, match="got -1"):
        check_seed("--seed", -1, low=0)


@pytest.mark.parametrize("value", [True, "3", None, 2.5, math.nan, math.inf])
def test_check_int_refuses_what_is_not_a_whole_number(value):
    with pytest.raises(ValueError, match="steps must be a whole number"):
        check_int("steps", value, 1)


def test_check_int_takes_ints_numpy_ints_and_whole_floats():
    assert check_int("n", np.int64(3), 1) == 3 and check_int("n", 4.0, 1) == 4
    assert type(check_int("n", np.int32(5), 1)) is int
    with pytest.raises(ValueError, match="n must be a whole number between 1 and 4, got 5"):
        check_int("n", 5, 1, 4)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.5])
def test_check_number_refuses_nan_inf_and_below(value):
    with pytest.raises(ValueError, match="g must be a finite number >= 0"):
        check_number("g", value, low=0.0)


def test_check_number_open_bound():
    assert check_number("lr", 1e-4, above=0.0) == 1e-4
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got 0"):
        check_number("lr", 0.0, above=0.0)
    with pytest.raises(ValueError, match="lr must be a number, got 'x'"):
        check_number("lr", "x", above=0.0)


def test_pipeline_generator_seed_is_checked_for_every_prompt():
    from engine.pipeline import _generators

    assert len(_generators(SEED_MAX - 1, 2)) == 2
    with pytest.raises(ValueError, match="generator must be a whole number"):
        _generators(SEED_MAX, 2)  # prompt 1 would get SEED_MAX + 1
    with pytest.raises(ValueError, match="generator must be a whole number"):
        _generators(2 ** 64, 1)


def test_pipe_call_refuses_an_overflowing_seed_before_any_network_runs():
    from engine.pipeline import CMDPipeline

    pipe = CMDPipeline.from_pretrained("random:default")
    calls = []
    pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="generator must be a whole number"):
        pipe("a red circle", generator=2 ** 64, num_inference_steps=1, progress=False)
    assert calls == []
    for kwargs, needle in ((dict(num_inference_steps=math.nan), "num_inference_steps"),
                           (dict(guidance_scale=math.inf), "guidance_scale"),
                           (dict(num_videos_per_prompt=0), "num_videos_per_prompt"),
                           (dict(motion_variations=10 ** 9), "motion_variations")):
        with pytest.raises(ValueError, match=needle):
            pipe("a red circle", progress=False, **kwargs)
    assert calls == []


# (module, argv, what the one line names). Each bad number is refused while the flags are parsed or, for
# seeds derived from the count of prompts or clips, before any weights load.
BAD = [
    ("engine.run", ["--prompt", "x", "--out", "v.npy", "--seed", TOO_BIG], "--seed must be a whole number between"),
    ("engine.run", ["--prompt", "x", "--out", "v.npy", "--seed", "1.5"], "--seed must be a whole number, got 1.5"),
    ("engine.run", ["--prompts-file", "{prompts}", "--out-dir", "videos", "--seed", str(SEED_MAX - 1)],
     "--seed + 0 .. 2"),
    ("engine.run", ["--prompt", "x", "--out", "v.npy", "--num-videos", "0"], "--num-videos must be"),
    ("engine.run", ["--prompt", "x", "--out", "v.npy", "--steps", "nan"], "--steps must be a whole number"),
    ("engine.run", ["--prompt", "x", "--out", "v.npy", "--guidance", "inf"], "--guidance must be a finite number"),
    ("engine.run", ["--prompt", "x", "--out", "v.npy", "--fps", "1e9"], "--fps must be a finite number between"),
    ("engine.run", ["--prompt", "x", "--out", "v.npy", "--cache-threshold", "-1"], "--cache-threshold must be"),
    ("engine.run", ["--prompt", "x", "--out", "v.npy", "--guidance-interval", "0", "nan"], "--guidance-interval"),
    ("engine.run", ["--prompt", "x", "--out", "v.npy", "--batch-size", "0"], "--batch-size must be"),
    ("engine.run", ["--prompt", "x", "--out", "v.npy", "--num-videos", "2000"], "num_videos_per_prompt must be"),
    ("engine.bench", ["latency", "--seed", TOO_BIG], "--seed must be"),
    ("engine.bench", ["latency", "--seed", str(SEED_MAX), "--batch", "2"], "--seed + 0 .. 1"),
    ("engine.bench", ["latency", "--iters", "0"], "--iters must be"),
    ("engine.bench", ["latency", "--warmup", "-1"], "--warmup must be"),
    ("engine.bench", ["cache", "--num-prompts", "0"], "--num-prompts must be"),
    ("engine.bench", ["flops", "--steps", "0"], "--steps must be"),
    ("engine.profile", ["--row-limit", "0"], "--row-limit must be"),
    ("engine.profile", ["--batch", "-3"], "--batch must be"),
    ("engine.calibrate_cache", ["--model", "default", "--threshold", "nan"], "--threshold must be"),
    ("engine.calibrate_cache", ["--model", "default", "--seed", TOO_BIG], "--seed must be"),
    ("engine.calibrate_cache", ["--model", "default", "--batch-size", "0"], "--batch-size must be"),
    ("export.__main__", ["onnx", "--max-batch", "0"], "--max-batch must be"),
    ("export.__main__", ["onnx", "--opset", "18.5"], "--opset must be a whole number"),
    ("export.__main__", ["tensorrt", "--onnx", "x", "--workspace-gb", "inf"], "--workspace-gb must be"),
    ("trainer.train", ["--stage", "autoencoder", "--out", "run", "--seed", str(2 ** 32)], "--seed must be"),
    ("trainer.train", ["--stage", "autoencoder", "--out", "run", "--seed", "-1"], "--seed must be"),
    ("trainer.train", ["--stage", "autoencoder", "--out", "run", "--lr", "nan"], "--lr must be a finite number > 0"),
    ("trainer.train", ["--stage", "autoencoder", "--out", "run", "--steps", "0"], "--steps must be"),
    ("trainer.train", ["--stage", "autoencoder", "--out", "run", "--keep", "0"], "--keep must be"),
    ("trainer.train", ["--stage", "autoencoder", "--out", "run", "--workers", "-1"], "--workers must be"),
    ("trainer.evaluate", ["--model", "m", "--num-clips", "1"], "--num-clips must be"),
    ("trainer.evaluate", ["--model", "m", "--seed", "-1"], "--seed must be"),
    ("trainer.evaluate", ["--model", "m", "--guidance", "nan"], "--guidance must be"),
    ("trainer.text_cache", ["--out", "c.safetensors", "--num-clips", "0"], "--num-clips must be"),
    ("benchmarks.cache_quality", ["--num-clips", "0"], "--num-clips must be"),
    ("benchmarks.cache_quality", ["--seed", TOO_BIG], "--seed must be"),
    ("benchmarks.paper_scale", ["--repeats", "0"], "--repeats must be"),
    ("benchmarks.paper_scale", ["--frames", "16,0"], "--frames must be"),
    ("benchmarks.paper_scale", ["--seed", TOO_BIG], "--seed must be"),
    ("benchmarks.lease_summary", ["collect", "--work", "w", "--out", "o", "--budget-s", "-5"], "--budget-s must be"),
]


@pytest.mark.parametrize("module,argv,needle", BAD, ids=[f"{m}:{' '.join(a[-2:])}" for m, a, _ in BAD])
def test_every_cli_refuses_bad_numbers_in_one_line_before_any_work(module, argv, needle, tmp_path, monkeypatch,
                                                                   capsys):
    from engine.pipeline import CMDPipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the bad number was refused")

    monkeypatch.setattr(CMDPipeline, "from_pretrained", no_loading)
    prompts = tmp_path.parent / f"{tmp_path.name}-prompts.txt"
    prompts.write_text("a\nb\nc\n")
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{prompts}", str(prompts)) for a in argv]
    main = importlib.import_module(module).main
    try:
        code = main(argv)
    except SystemExit as e:  # benchmarks.paper_scale's parse_args: engine.cli.fail
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_argparse_messages_read_like_the_rules():
    p = cli.Parser()
    p.add_argument("--steps", type=cli.Int())
    with pytest.raises(cli.UsageError, match=r"^--steps must be a whole number >= 1, got 0$"):
        p.parse_args(["--steps", "0"])
    with pytest.raises(cli.UsageError, match=r"^--steps must be a whole number, got 'many'$"):
        p.parse_args(["--steps", "many"])
