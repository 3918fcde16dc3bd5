"""Adapter training (trainer.train --lora): the adapter file it writes loads into the engine and changes the
output, the --init folder's files are never modified, --resume continues exactly, torchrun works, and bad
flags are one line with exit code 2."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.adapters import read_adapter
from test_distributed import REPO, WORKER  # noqa: E402  (tests/trainer is on sys.path under pytest)
from test_train_stages import run, tiny_config  # noqa: E402
from trainer.train import main

NETWORK = {"autoencoder": "autoencoder", "content": "content_unet", "motion": "motion_dit"}


def folder_digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny three-stage model folder to adapt."""
    root = tmp_path_factory.mktemp("lora-base")
    config = tiny_config(root / "tiny.json")
    for stage, steps in (("autoencoder", 2), ("content", 2), ("motion", 2)):
        run(stage, root / "run", config, steps)
    return config, str(root / "run" / "model")


def lora_run(out, init, stage, steps, *extra):
    return main(["--stage", stage, "--init", init, "--data", "synthetic", "--out", str(out), "--steps", str(steps),
                 "--num-clips", "4", "--batch-size", "2", "--checkpoint-every", "2", "--log-every", "1",
                 "--sample-every", "0", "--no-progress", "--threads", "1", "--lora", "2", "--lr", "1e-2", *extra])


@pytest.mark.parametrize("stage", ["content", "motion", "autoencoder"])
def test_lora_trains_an_adapter_the_engine_loads_and_leaves_the_base_alone(tmp_path, base, stage):
    from engine.pipeline import CMDPipeline

    _, init = base
    before = folder_digest(init)
    assert lora_run(tmp_path / "o", init, stage, 2) == 0
    assert folder_digest(init) == before  # the base weights are never modified
    assert not (tmp_path / "o" / "model").exists()  # no model folder: the adapter is the result
    path = str(tmp_path / "o" / "adapter.safetensors")
    adapter = read_adapter(path)
    part = adapter.networks[NETWORK[stage]]
    assert list(adapter.networks) == [NETWORK[stage]] and adapter.steps == "2" and part.rank == 2
    assert any(b.abs().max() > 0 for _, b in part.layers.values())  # B moved from its zero start
    if stage == "autoencoder":  # the decoder side only: the encodings the other networks read stay
        assert all(not m.startswith(("encoder_blocks", "patch_embed", "importance_head", "motion_head"))
                   for m in part.layers)
    pipe = CMDPipeline.from_pretrained(init)
    call = dict(num_inference_steps=2, motion_steps=2, generator=0, progress=False)
    plain = pipe("a red circle moving right", **call).frames
    pipe.load_lora_weights(path)
    assert not np.array_equal(pipe("a red circle moving right", **call).frames, plain)
    pipe.unload_lora_weights()
    assert np.array_equal(pipe("a red circle moving right", **call).frames, plain)


def test_resume_continues_exactly(tmp_path, base):
    _, init = base
    assert lora_run(tmp_path / "straight", init, "motion", 4) == 0
    assert lora_run(tmp_path / "split", init, "motion", 2) == 0
    assert lora_run(tmp_path / "split", init, "motion", 4, "--resume") == 0
    a = read_adapter(str(tmp_path / "straight" / "adapter.safetensors")).networks["motion_dit"].layers
    b = read_adapter(str(tmp_path / "split" / "adapter.safetensors")).networks["motion_dit"].layers
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]), k


def test_lora_targets_and_alpha(tmp_path, base):
    _, init = base
    assert lora_run(tmp_path / "o", init, "motion", 2, "--lora-targets", "text_proj", "--lora-alpha", "4") == 0
    part = read_adapter(str(tmp_path / "o" / "adapter.safetensors")).networks["motion_dit"]
    assert list(part.layers) == ["text_proj"] and part.alpha == 4.0 and part.scaling == 2.0


@pytest.mark.parametrize("extra,needle", [
    (["--lora", "0"], "rank of at least 1"),
    (["--lora", "2", "--lora-targets", "no_such_layer"], "matches no linear layer"),
    (["--lora", "2", "--finetune"], "--finetune does not apply"),
    (["--lora-alpha", "4"], "need --lora RANK"),
])
def test_bad_lora_flags_are_one_line_exit_2(tmp_path, base, capsys, extra, needle):
    _, init = base
    argv = ["--stage", "motion", "--init", init, "--data", "synthetic", "--out", str(tmp_path / "o"), "--steps", "1",
            "--num-clips", "4", "--batch-size", "2", "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o" / "adapter.safetensors").exists()


def test_lora_needs_init(tmp_path, capsys):
    assert main(["--stage", "motion", "--out", str(tmp_path / "o"), "--lora", "2", "--no-progress"]) == 2
    assert "--lora needs --init" in capsys.readouterr().err


def test_two_process_lora_run(tmp_path, base):
    _, init = base
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(script), "--stage", "motion", "--init", init, "--data", "synthetic", "--out", str(out), "--steps", "2",
           "--batch-size", "2", "--num-clips", "8", "--checkpoint-every", "2", "--sample-every", "0", "--no-progress",
           "--threads", "1", "--device", "cpu", "--lora", "2", "--lr", "1e-2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    lora = [k for k in a if "lora_" in k]
    assert lora and all(torch.equal(a[k], b[k]) for k in a)
    assert read_adapter(str(out / "adapter.safetensors")).steps == "2"
