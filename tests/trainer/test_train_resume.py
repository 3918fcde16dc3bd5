"""--resume continues so that every following step's loss, the final weights and every random state
(noise generator, torch CPU, numpy, Python, the data loader's; per process) equal those of an
uninterrupted run; a crash during a checkpoint save leaves the previous checkpoint loadable."""

import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import trainer.train
from trainer import checkpoint as ckpt
from trainer.train import main
from test_train_stages import tiny_config  # noqa: E402  (tests/trainer is on sys.path under pytest)


def argv(stage, out, config, steps, every, *extra):
    return ["--stage", stage, "--config", config, "--data", "synthetic", "--out", str(out), "--steps", str(steps),
            "--batch-size", "2", "--num-clips", "6", "--checkpoint-every", str(every), "--log-every", "1",
            "--sample-every", "0", "--no-progress", "--threads", "1", *extra]


def logged(out, stage, key="loss"):
    """step -> the logged ``key`` of that step, the last record of each step winning (a resumed run logs the
    repeated steps again)."""
    found = {}
    for line in open(os.path.join(out, "logs", f"{stage}.jsonl")):
        record = json.loads(line)
        if "loss" in record:
            found[record["step"]] = record[key]
    return found


def losses(out, stage):
    return logged(out, stage)


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """A config and a stage-1 model folder for the later stages to start from."""
    root = tmp_path_factory.mktemp("resume")
    config = tiny_config(root / "tiny.json")
    assert main(argv("autoencoder", root / "ae", config, 1, 1)) == 0
    return config, str(root / "ae" / "model")


# The motion stage covers noise, timesteps, text dropout and the per-clip encoding cache (re-filled after a
# resume); 6 clips in batches of 2 make the run cross epoch boundaries at steps 3 and 6.
@pytest.mark.parametrize("stage", ["autoencoder", "motion"])
def test_resume_equals_uninterrupted(tmp_path, stage_one, stage):
    config, init = stage_one
    extra = ("--init", init) if stage != "autoencoder" else ()
    assert main(argv(stage, tmp_path / "full", config, 5, 5, *extra)) == 0
    assert main(argv(stage, tmp_path / "part", config, 2, 2, *extra)) == 0  # "interrupted" after step 2
    assert main(argv(stage, tmp_path / "part", config, 5, 5, "--resume", *extra)) == 0
    full, part = losses(tmp_path / "full", stage), losses(tmp_path / "part", stage)
    assert sorted(part) == [1, 2, 3, 4, 5]
    for step in (3, 4, 5):
        assert part[step] == full[step], f"step {step}: {part[step]} != {full[step]}"
    a = ckpt.latest_checkpoint(str(tmp_path / "full" / "checkpoints" / stage))
    b = ckpt.latest_checkpoint(str(tmp_path / "part" / "checkpoints" / stage))
    for name in ("model", "ema"):
        wa, wb = load_file(os.path.join(a, f"{name}.safetensors")), load_file(os.path.join(b, f"{name}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name} weights differ after resume"
    assert_same_rng_states(a, b)


def assert_same_rng_states(a, b):
    """Every random state saved at the same step by two runs is equal, and every kind is there."""
    ra, rb = load_file(os.path.join(a, "rng.safetensors")), load_file(os.path.join(b, "rng.safetensors"))
    assert {"generator.0", "torch_cpu.0", "numpy.0", "numpy_gauss.0", "python.0", "python_gauss.0",
            "loader.0"} <= set(ra)
    assert ra.keys() == rb.keys()
    for key in ra:
        assert torch.equal(ra[key], rb[key]), f"random state {key} differs from the uninterrupted run's"


@pytest.fixture
def dropout_everywhere(monkeypatch):
    """Every loss also draws from torch's, numpy's and Python's global generators (as dropout or a data
    augmentation would): the losses after a resume are equal only if those states were restored."""
    real = trainer.train.make_stage

    def make_stage(*args, **kwargs):
        stage = real(*args, **kwargs)
        loss_of = stage.loss

        def loss(net, inputs, generator):
            value, extra = loss_of(net, inputs, generator)
            keep = torch.nn.functional.dropout(torch.ones(16), p=0.5, training=True).mean()
            return value * (1 + 0.1 * keep + 0.1 * float(np.random.rand()) + 0.1 * random.random()), extra

        stage.loss = loss
        return stage

    monkeypatch.setattr(trainer.train, "make_stage", make_stage)


def test_resume_restores_every_random_state(tmp_path, stage_one, dropout_everywhere):
    """Interrupted at step 2 (mid-epoch) and at step 3 (an epoch boundary), resumed in a process whose global
    generators were left elsewhere: losses and all random states equal the uninterrupted run's."""
    config, _ = stage_one
    assert main(argv("autoencoder", tmp_path / "full", config, 5, 1)) == 0
    full = losses(tmp_path / "full", "autoencoder")
    for stop in (2, 3):
        part = tmp_path / f"part{stop}"
        assert main(argv("autoencoder", part, config, stop, stop)) == 0
        torch.manual_seed(stop + 1000)  # what else ran in this process must not matter
        np.random.seed(stop + 2000)
        random.seed(stop + 3000)
        assert main(argv("autoencoder", part, config, 5, 1, "--resume")) == 0
        resumed = losses(part, "autoencoder")
        for step in range(stop + 1, 6):
            assert resumed[step] == full[step], f"stopped at {stop}: step {step}: {resumed[step]} != {full[step]}"
        for step in (4, 5):  # the checkpoints both runs keep (--keep 3)
            assert_same_rng_states(os.path.join(tmp_path / "full" / "checkpoints" / "autoencoder", f"step-{step:08d}"),
                                   os.path.join(part / "checkpoints" / "autoencoder", f"step-{step:08d}"))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, stage_one, monkeypatch):
    config, _ = stage_one
    out = tmp_path / "run"
    real_save = ckpt._save_tensors

    def crash_on_step_2(tensors, path):
        if "step-00000002" in os.path.basename(os.path.dirname(path)) and path.endswith("optimizer.safetensors"):
            raise KeyboardInterrupt("simulated kill during the save")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "_save_tensors", crash_on_step_2)
    # A kill (Ctrl-C) mid-save: the CLI's exit code for an interrupt (engine.cli, issue 15 item 6).
    assert main(argv("autoencoder", out, config, 3, 1)) == 130
    root = str(out / "checkpoints" / "autoencoder")
    assert [step for step, _ in ckpt.list_checkpoints(root)] == [1]
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")], "half-written checkpoint left behind"
    monkeypatch.setattr(ckpt, "_save_tensors", real_save)
    # The previous checkpoint loads and the run resumes from it to the end.
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(root))["state"]["step"] == 1
    assert main(argv("autoencoder", out, config, 3, 1, "--resume")) == 0
    assert [step for step, _ in ckpt.list_checkpoints(root)] == [1, 2, 3]
    records = [json.loads(line) for line in open(out / "logs" / "autoencoder.jsonl")]
    starts = [r["start_step"] for r in records if r.get("event") == "start"]
    assert starts == [0, 1]
