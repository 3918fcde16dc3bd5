"""python -m engine.run on a tiny random model saved to a folder: outputs, batches from a prompts file,
and every kind of bad input (exit 2, one line naming the value, no file), in process and for real."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import engine.default_model
from engine.run import main
from engine.video_io import read_video

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(os.path.dirname(__file__), "tiny_config.json")
FAST = ["--steps", "2", "--motion-steps", "2", "--quiet"]


pytestmark = pytest.mark.usefixtures("fast_cpu")  # tests/engine/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.pipeline import CMDPipeline

    path = str(tmp_path_factory.mktemp("models") / "tiny")
    CMDPipeline.from_pretrained("random:" + TINY).model.save_pretrained(path)
    return path


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_npy_mp4_gif_and_reports(tmp_path, capsys, model_dir):
    pytest.importorskip("imageio_ffmpeg", reason="mp4/gif writing needs imageio-ffmpeg")
    npy = str(tmp_path / "a.npy")
    code, out, err = _run(capsys, ["--prompt", "a red circle", "--model", model_dir, "--out", npy, *FAST])
    assert code == 0, err
    frames = np.load(npy)
    assert frames.shape == (4, 16, 16, 3) and frames.dtype == np.uint8
    assert f"wrote {npy}" in out
    timing = [line for line in out.splitlines() if line.startswith("timings (s):")]
    assert len(timing) == 1 and all(k in timing[0] for k in ("text", "content", "motion", "decode", "total"))

    mp4 = str(tmp_path / "b.mp4")
    code, out, err = _run(capsys, ["--prompt", "a red circle", "--model", model_dir, "--out", mp4, "--num-videos", "2",
                                   "--fps", "6", *FAST])
    assert code == 0, err
    assert os.path.getsize(tmp_path / "b-0.mp4") > 0 and os.path.getsize(tmp_path / "b-1.mp4") > 0

    import imageio.v3 as iio

    iio.imwrite(tmp_path / "start.png", (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    gif = str(tmp_path / "c.gif")
    code, out, err = _run(capsys, ["--prompt", "moving left", "--model", model_dir, "--image",
                                   str(tmp_path / "start.png"), "--frames", "3", "--out", gif, *FAST[2:]])
    assert code == 0, err
    assert read_video(gif).shape == (3, 16, 16, 3)
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "b-0.mp4", "b-1.mp4", "c.gif", "start.png"]


def test_prompts_file_batches_equal_single_runs(tmp_path, capsys, model_dir):
    prompts = ["a red circle moving right", "", "a blue square moving up"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")  # the blank line is skipped
    out_dir = tmp_path / "videos"
    code, out, err = _run(capsys, ["--prompts-file", str(tmp_path / "prompts.txt"), "--out-dir", str(out_dir),
                                   "--format", "npy", "--batch-size", "2", "--seed", "10", "--model", model_dir, *FAST])
    assert code == 0, err
    assert sorted(os.listdir(out_dir)) == ["000.npy", "001.npy"]
    single = str(tmp_path / "single.npy")
    code, _, err = _run(capsys, ["--prompt", prompts[2], "--seed", "11", "--out", single, "--model", model_dir, *FAST])
    assert code == 0, err
    diff = np.abs(np.load(out_dir / "001.npy").astype(int) - np.load(single).astype(int))
    assert diff.max() <= 1  # batched numerics may flip a rounding, nothing more


def _corrupt_weights(model_dir, tmp_path):
    bad = str(tmp_path / "corrupt")
    shutil.copytree(model_dir, bad)
    weights = os.path.join(bad, "motion_dit", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    return bad


def _missing_network(model_dir, tmp_path):
    bad = str(tmp_path / "nounet")
    shutil.copytree(model_dir, bad)
    shutil.rmtree(os.path.join(bad, "content_unet"))
    return bad


def _corrupt_config(model_dir, tmp_path):
    bad = str(tmp_path / "badconfig")
    shutil.copytree(model_dir, bad)
    with open(os.path.join(bad, "cmd_config.json"), "w") as f:
        f.write("{not json")
    return bad


BAD = [
    (["--frames", "0"], "--frames must be a whole number >= 1, got 0"),
    (["--frames", "99"], "got 99"),
    (["--height", "18"], "got 18"),
    (["--width", "4096"], "got 4096"),
    (["--steps", "-3"], "--steps must be a whole number >= 1, got -3"),
    (["--steps", "nan"], "got nan"),
    (["--motion-steps", "inf"], "--motion-steps"),
    (["--steps", "2.5"], "got 2.5"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0, got -1"),
    (["--guidance", "inf"], "got inf"),
    (["--motion-guidance", "nan"], "--motion-guidance"),
    (["--scheduler", "euler"], "'euler'"),
    (["--num-videos", "0"], "--num-videos"),
    (["--fps", "0"], "--fps"),
    (["--backend", "warp"], "unknown backend 'warp'"),
    (["--dtype", "float8"], "'float8'"),
    (["--device", "tpu"], "'tpu'"),
    (["--seed", "x"], "'x'"),
    (["--image", "{tmp}/missing.png"], "missing.png"),
    (["--image", "{tmp}/garbage.png"], "garbage.png"),
    (["--out", "{tmp}/v.avi"], "'.avi'"),
    (["--out", "{tmp}/garbage.png/v.npy"], "garbage.png' is not a writable folder"),  # a missing folder is made
    (["--out", "{tmp}/adir.npy"], "is a folder"),
    (["--model", "{tmp}/nowhere"], "nowhere"),
    (["--model", "{badconfig}"], "badconfig"),
    (["--model", "{corrupt}"], "motion_dit"),
    (["--model", "{nounet}"], "content_unet"),
    (["--model", "random:sd99"], "'sd99'"),
]
if not torch.cuda.is_available():
    BAD += [(["--device", "cuda"], "CUDA is not available"),
            (["--backend", "cudagraph"], "'cudagraph' needs --device cuda")]


@pytest.mark.parametrize("args, needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line_and_no_file(tmp_path, capsys, model_dir, args, needle):
    (tmp_path / "garbage.png").write_text("not a png")
    (tmp_path / "adir.npy").mkdir()
    names = {"tmp": str(tmp_path), "badconfig": "", "corrupt": "", "nounet": ""}
    if any("{badconfig}" in a for a in args):
        names["badconfig"] = _corrupt_config(model_dir, tmp_path)
    if any("{corrupt}" in a for a in args):
        names["corrupt"] = _corrupt_weights(model_dir, tmp_path)
    if any("{nounet}" in a for a in args):
        names["nounet"] = _missing_network(model_dir, tmp_path)
    args = [a.format(**names) for a in args]
    before = set(os.listdir(tmp_path))
    argv = ["--prompt", "a circle", "--model", model_dir, "--out", str(tmp_path / "out.npy"), *FAST]
    for i in range(0, len(args), 2):  # the case's flags replace the defaults
        if args[i] in argv:
            j = argv.index(args[i])
            argv[j + 1] = args[i + 1]
        else:
            argv += args[i:i + 2]
    if "--image" in argv:  # the content model does not run: its --steps would be refused first
        del argv[argv.index("--steps"):argv.index("--steps") + 2]
    code, out, err = _run(capsys, argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert set(os.listdir(tmp_path)) == before  # nothing written, not even a temporary file


def test_usage_errors_and_missing_default_weights(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "v.mp4")
    cases = [
        (["--out", out], "exactly one of --prompt"),
        (["--prompt", "x"], "--prompt needs --out"),
        (["--prompts-file", str(tmp_path / "p.txt"), "--out-dir", str(tmp_path)], "prompts file not found"),
        (["--prompts-file", str(tmp_path / "p.txt")], "--prompts-file needs --out-dir"),
        (["--prompt", "x", "--out", out, "--bogus"], "--bogus"),
    ]
    monkeypatch.setattr(engine.default_model, "DEFAULT_MODEL_DIR", str(tmp_path / "weights" / "default"))
    cases.append((["--prompt", "x", "--out", out], "no default weights yet"))
    (tmp_path / "empty.txt").write_text("\n\n")
    cases.append((["--prompts-file", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path / "o")], "no prompts"))
    for argv, needle in cases:
        code, _, err = _run(capsys, argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return env


def test_real_process_bad_value_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine.run", "--prompt", "x", "--model", "random:" + TINY,
                           "--frames", "-4", "--out", str(tmp_path / "v.npy")],
                          capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --frames must be a whole number >= 1, got -4"
    assert os.listdir(tmp_path) == []


@contextmanager
def _as_a_shell_starts_it():
    """Children started in this block get Ctrl-C at its default and no signal blocked. An ignored or blocked
    SIGINT is inherited (and Python then keeps it ignored); in two full-suite runs the child carried on
    generating 120 s after the SIGINT (its stacks: still in the motion loop), so something earlier in the suite
    left the test process that way, while this test passes alone. Set here, in the parent's main thread, not in
    a preexec_fn (unsafe with threads)."""
    handler = signal.signal(signal.SIGINT, signal.SIG_DFL)
    mask = signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, handler)


def test_ctrl_c_leaves_no_partial_file(tmp_path, model_dir):
    out = tmp_path / "v.npy"
    # stdout is not read here: a pipe nobody reads could fill and block the child's exit. -X faulthandler: a
    # child that outlives the wait below is made to print its threads' stacks (SIGABRT) into the failure.
    with _as_a_shell_starts_it():
        proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "engine.run", "--prompt", "x",
                                 "--model", model_dir, "--steps", "1000", "--motion-steps", "1000", "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=str(tmp_path))
    err = bytearray()
    started = threading.Event()

    def read():
        for chunk in iter(lambda: proc.stderr.read1(256), b""):
            err.extend(chunk)
            if b"content:" in err:  # the progress bar: generation is under way
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(240), bytes(err).decode(errors="replace")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=30)
        reader.join(timeout=10)
        pytest.fail("the interrupted run did not exit within 120 s; its stderr:\n" + bytes(err).decode(errors="replace")[-6000:])
    reader.join(timeout=10)
    assert code == 130
    assert bytes(err).decode().strip().splitlines()[-1].split("\r")[-1].startswith("error: interrupted")
    assert os.listdir(tmp_path) == []
