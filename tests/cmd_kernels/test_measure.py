"""kernels.measure: the one environment record, the ceilings and the latency loop every benchmark uses."""

import random

import torch

from cmd_kernels import measure


def test_environment_record_on_a_cpu():
    env = measure.environment("cpu", torch.float32)
    assert env["device"] == "cpu" and env["device_type"] == "cpu" and env["dtype"] == "float32"
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads() and env["cores"] >= 1
    assert env["git_rev"] and len(env["git_rev"].split("+")[0]) == 40  # this is a git checkout
    assert env["utc"].endswith("Z") and "gpu" not in env
    assert "dtype" not in measure.environment(torch.device("cpu"))
    assert measure.package_version("no-such-distribution-cmd") is None


def test_revision_recorded_for_a_tree_without_git(tmp_path):
    """--prepare records the revision in .lease/ (the device machine gets the tree without .git); git_rev
    reads it where there is no checkout, and git itself where there is one."""
    record_path = str(tmp_path / ".lease" / "revision.json")
    record = measure.write_revision(record_path)
    assert len(record["rev"]) == 40 and isinstance(record["dirty"], bool)
    no_git = tmp_path / "tree"
    no_git.mkdir()
    expected = record["rev"] + ("+dirty" if record["dirty"] else "")
    assert measure.git_rev(str(no_git), record_path) == expected
    assert measure.git_rev(str(no_git), str(tmp_path / "missing.json")) is None
    (tmp_path / "bad.json").write_text("[1]")
    assert measure.git_rev(str(no_git), str(tmp_path / "bad.json")) is None
    assert measure.git_rev(recorded=str(tmp_path / "missing.json")) == measure.git_rev()  # git first
    try:
        measure.write_revision(str(tmp_path / "x.json"), str(no_git))
    except RuntimeError as e:
        assert "not a git checkout" in str(e) and not (tmp_path / "x.json").exists()
    else:
        raise AssertionError("no revision outside a checkout")


def test_wall_times_runs_warmup_then_repeats_and_keeps_results():
    calls = []
    repeats, warmup = random.randint(2, 5), random.randint(0, 3)
    seconds, results = measure.wall_times(lambda: calls.append(len(calls)) or len(calls), "cpu", repeats, warmup)
    assert len(calls) == warmup + repeats and results == list(range(warmup + 1, warmup + repeats + 1))
    assert len(seconds) == repeats and all(s >= 0 for s in seconds)


def test_ceilings_on_a_cpu_are_measured_and_plausible():
    n = random.choice([64, 96, 128])
    tflops = measure.matmul_tflops("cpu", torch.float32, n=n, repeats=2)
    assert 1e-6 < tflops < 100  # a CPU core does between a MFLOP/s and 100 TFLOP/s
    assert 1e-3 < measure.copy_gbps("cpu", nbytes=1 << 20, repeats=2) < 1e4
    out = measure.ceilings("cpu")
    assert set(out) == {"copy_gbps", "matmul_tflops"} and all(v > 0 for v in out.values())
