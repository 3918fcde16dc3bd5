"""A run folder never mixes two runs: without --resume, a stage refuses a folder that holds a run of that
stage (one line, exit 2, nothing changed); --overwrite starts it again from a clean slate."""

import json
import os

import pytest

from trainer.train import main
from test_train_resume import argv  # noqa: E402  (tests/trainer is on sys.path under pytest)
from test_train_stages import tiny_config  # noqa: E402


def _tree(root):
    """relative path -> (size, mtime_ns) of every file below root."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runfolder")
    config = tiny_config(root / "tiny.json")
    out = root / "run"
    assert main(argv("autoencoder", out, config, 2, 2, "--seed", "1")) == 0
    return config, out


def test_a_second_run_without_resume_refuses_and_changes_nothing(first_run, capsys):
    config, out = first_run
    before = _tree(out)
    capsys.readouterr()
    assert main(argv("autoencoder", out, config, 1, 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "already holds a run of the autoencoder stage" in err[0], err
    for name in ("checkpoints/autoencoder", "logs/autoencoder.jsonl", "model", "--resume", "--overwrite"):
        assert name in err[0], err
    assert _tree(out) == before


def test_resume_and_overwrite_together_refuse(first_run, capsys):
    config, out = first_run
    assert main(argv("autoencoder", out, config, 3, 3, "--resume", "--overwrite")) == 2
    assert "give one" in capsys.readouterr().err


def test_a_later_stage_run_twice_refuses_too(first_run, capsys, tmp_path):
    config, out = first_run
    import shutil

    run = tmp_path / "run"
    shutil.copytree(out, run)
    assert main(argv("motion", run, config, 1, 1)) == 0
    capsys.readouterr()
    assert main(argv("motion", run, config, 1, 1)) == 2
    err = capsys.readouterr().err
    assert "run of the motion stage" in err and "checkpoints/motion" in err


def test_overwrite_starts_again_from_a_clean_folder(first_run, tmp_path):
    config, out = first_run
    import shutil

    run = tmp_path / "run"
    shutil.copytree(out, run)
    old_steps = sorted(os.listdir(run / "checkpoints" / "autoencoder"))
    assert old_steps  # the first run's checkpoint
    assert main(argv("autoencoder", run, config, 1, 1, "--overwrite")) == 0
    assert sorted(os.listdir(run / "checkpoints" / "autoencoder")) == ["step-00000001"]
    records = [json.loads(line) for line in open(run / "logs" / "autoencoder.jsonl")]
    assert max(r.get("step", 0) for r in records) == 1  # the old run's log is gone, not appended to
    assert sum(r.get("event") == "done" for r in records) == 1
