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
