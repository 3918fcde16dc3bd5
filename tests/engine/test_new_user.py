"""What a new user met on the way (issue 25.8): the CPU thread policy on a busy machine, noise from normal
commands, --help texts, engine.run's batch default, flags that would be silently ignored, prompts-file comments."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import engine.cpu as cpu
from engine.cli import read_prompts
from engine.run import build_parser, main as run_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "random:" + os.path.join(os.path.dirname(__file__), "tiny_config.json")


# -- (a) CPU threads ------------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", cpu.ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("cores, others, default, want", [(2, 0, 2, 2), (2, 1, 2, 1), (2, 3, 2, 1), (8, 2, 8, 6),
                                                           (8, 0, 4, 4), (1, 0, 1, 1)])
def test_load_mode_follows_the_cores_no_other_process_holds(clean_env, cores, others, default, want):
    clean_env.setattr(cpu, "usable_cores", lambda: cores)
    clean_env.setattr(cpu, "runnable_others", lambda: others)
    clean_env.setenv(cpu.ENV, "load")
    assert cpu.threads_for_now(default) == want


@pytest.mark.parametrize("cores, default, want", [(2, 2, 2), (8, 4, 4), (4, 8, 4), (1, 2, 1)])
def test_the_default_is_the_usable_cores_whatever_the_load(clean_env, cores, default, want):
    """The default count is fixed for the machine (a seed gives the same bytes on a busy machine)."""
    clean_env.setattr(cpu, "usable_cores", lambda: cores)
    for others in (0, 1, 5, None):
        clean_env.setattr(cpu, "runnable_others", lambda: others)
        assert cpu.threads_for_now(default) == want


def test_the_users_choice_wins(clean_env):
    clean_env.setattr(cpu, "runnable_others", lambda: 5)
    clean_env.setattr(cpu, "usable_cores", lambda: 2)
    clean_env.setenv("OMP_NUM_THREADS", "2")
    assert cpu.threads_for_now(2) is None  # left as the user set it
    clean_env.delenv("OMP_NUM_THREADS")
    for value, want in (("torch", None), ("3", 3), ("auto", 2), ("load", 1)):
        clean_env.setenv(cpu.ENV, value)
        assert cpu.threads_for_now(2) == want, value
    for bad in ("0", "-1", "many"):
        clean_env.setenv(cpu.ENV, bad)
        with pytest.raises(ValueError, match=f"{cpu.ENV} must be auto, load, torch or a whole number >= 1, got '{bad}'"):
            cpu.threads_for_now(2)


def test_runnable_others_reads_the_kernels_count(tmp_path):
    (tmp_path / "loadavg").write_text("1.00 0.50 0.25 3/200 12345\n")
    assert cpu.runnable_others(str(tmp_path / "loadavg")) == 2  # less the reader itself
    assert cpu.runnable_others(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("env, want", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                       ({"OMP_NUM_THREADS": "1"}, "unset"), ({cpu.ENV: "torch"}, "unset")])
def test_importing_engine_sets_the_passive_wait_policy_unless_the_user_chose(env, want):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", cpu.ENV)}
    out = subprocess.run([sys.executable, "-c", "import engine, os; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"],
                         env=dict(base, PYTHONPATH=ROOT, **env), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want


def test_a_pipeline_call_runs_on_the_policys_threads_and_puts_the_count_back(clean_env):
    from engine.pipeline import CMDPipeline

    pipe = CMDPipeline.from_pretrained(TINY)
    seen = []
    decode = pipe.backend.decode
    pipe.backend.decode = lambda *a: (seen.append(torch.get_num_threads()), decode(*a))[1]
    before = torch.get_num_threads()
    clean_env.setattr(cpu, "threads_for_now", lambda default: 1 if default != 1 else 2)
    pipe("x", num_inference_steps=1, motion_steps=1, generator=0, progress=False)
    assert seen == [1 if before != 1 else 2] and torch.get_num_threads() == before


def test_bench_cpu_measures_every_setting_idle_and_busy(capsys):
    """A real run, small: one process per row, one call each, one busy loop."""
    from engine.bench import main

    assert main(["cpu", "--model", TINY, "--busy", "1", "--warmup", "0", "--iters", "1", "--rounds", "1",
                 "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(out[-1])["rows"]
    assert [(r["condition"], r["setting"]) for r in rows] == [
        (c, s) for c in ("no busy loops", "1 busy loops") for s in ("default", "one thread", "torch defaults")]
    for r in rows:
        assert r["median_s"] > 0 and len(r["times_s"]) == 1
        assert r["omp_wait_policy"] == {"default": "PASSIVE", "one thread": None, "torch defaults": None}[r["setting"]]
    assert all(r["threads"] == "1" for r in rows if r["setting"] == "one thread")
    assert "| machine | setting |" in "\n".join(out)


# -- (b) noise --------------------------------------------------------------------------------------------

def test_profiler_probe_lines_are_dropped_and_nothing_else(capfd):
    from engine.profile import _without_stderr_lines

    with _without_stderr_lines(b"USDT:"):
        os.write(2, b"USDT:2026 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a real message\n")
        print("from python", file=sys.stderr)
    os.write(2, b"USDT: after the block: kept\n")
    err = capfd.readouterr().err
    # (pytest's capture writes Python's sys.stderr to its file directly: only the lines are compared, not their order)
    assert sorted(err.splitlines()) == ["USDT: after the block: kept", "a real message", "from python"], err


def test_a_rotated_clip_is_read_upright_without_a_warning(tmp_path, caplog):
    import imageio_ffmpeg

    from engine.video_io import read_video, write_video

    frames = np.random.default_rng(0).integers(0, 256, (4, 16, 32, 3), dtype=np.uint8)
    write_video(str(tmp_path / "flat.mp4"), frames)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i",
                    str(tmp_path / "flat.mp4"), "-c", "copy", "-y", str(tmp_path / "turned.mp4")], check=True)
    with caplog.at_level(logging.WARNING):
        video = read_video(str(tmp_path / "turned.mp4"))
    assert video.shape == (4, 32, 16, 3)  # turned upright by ffmpeg, as the metadata asks
    assert not [r for r in caplog.records if "frame size" in r.getMessage()], caplog.records


# -- (c) --help -------------------------------------------------------------------------------------------

def test_bench_help_names_every_kind(capsys):
    from engine.bench import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for kind in ("latency", "memory", "flops", "cache", "cpu"):
        assert kind in out, kind


def test_every_engine_run_flag_has_help_and_says_its_default():
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.option_strings
        if action.default not in (None, False) or action.dest in ("frames", "height", "width", "steps", "fps"):
            assert "default" in action.help, (action.option_strings, action.help)


# -- (d) the batch default --------------------------------------------------------------------------------

def test_the_batch_default_is_the_most_the_backend_takes():
    from engine.run import DEFAULT_BATCH, _default_batch

    class Pipe:
        def __init__(self, limit):
            self.limit = limit

        def check_backend(self, request, batch):
            if batch > self.limit:
                raise ValueError(f"batch {batch} > {self.limit}")

    assert _default_batch(Pipe(4), None, 20) == 4  # an ONNX export's default max batch
    assert _default_batch(Pipe(100), None, 20) == DEFAULT_BATCH
    assert _default_batch(Pipe(100), None, 3) == 3
    assert _default_batch(Pipe(0), None, 20) == 1  # none fits: check_backend then says why


# -- (e) flags that would be ignored; (f) comments ------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--format", "gif"], "--format gif applies to --out-dir"),
    (["--image", "IMG", "--steps", "3"], "--steps set(s) the content model, which --image replaces"),
    (["--image", "IMG", "--guidance", "3"], "--guidance"),
    (["--image", "IMG", "--negative-prompt", "blurry"], "--negative-prompt"),
], ids=["format-with-out", "steps-with-image", "guidance-with-image", "negative-with-image"])
def test_flags_that_would_be_ignored_are_refused_in_one_line(tmp_path, capsys, extra, needle):
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "img.png")
    extra = [str(tmp_path / "img.png") if a == "IMG" else a for a in extra]
    out = tmp_path / "v.npy"
    code = run_main(["--prompt", "x", "--model", TINY, "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and needle in err and "\n" not in err, err
    assert not out.exists()


def test_motion_flags_with_an_image_are_used(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "img.png")
    code = run_main(["--prompt", "x", "--model", TINY, "--image", str(tmp_path / "img.png"), "--motion-steps", "1",
                     "--motion-guidance", "1", "--quiet", "--out", str(tmp_path / "v.npy")])
    assert code == 0, capsys.readouterr().err


def test_prompts_file_comments_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\nmoving left\n\n   # indented comment\nmoving right # not a comment\n")
    assert read_prompts(str(path)) == [(2, "moving left"), (5, "moving right # not a comment")]
    path.write_text("# only comments\n#\n")
    with pytest.raises(ValueError, match="no prompts in"):
        read_prompts(str(path))
    assert "# (comments)" in build_parser().format_help() or "with # (comments)" in " ".join(
        build_parser().format_help().split())


@pytest.mark.parametrize("package", ["engine", "trainer"])
def test_the_wait_policy_is_set_before_torch_loads(package):
    """OpenMP reads OMP_WAIT_POLICY when torch loads it: the packages a command starts from set it first."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", cpu.ENV)}
    code = f"import sys, os, {package}; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(base, PYTHONPATH=ROOT), capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "False"]
