"""benchmarks/lease_env.py: the lease's environment stage and the requirement check of carried wheels."""

import json

import pytest
import torch

from benchmarks import lease_env


def test_requirements_of_an_installed_distribution_are_checked_against_this_machine():
    from importlib import metadata

    report = lease_env.requirements(["pytest"])
    rows = report["distributions"]["pytest"]["requirements"]
    assert report["distributions"]["pytest"]["installed"] == metadata.version("pytest")
    assert report["ok"] is True and rows and all(r["met"] and r["installed"] for r in rows)
    assert not any("extra ==" in r["requirement"] for r in rows)  # extras' requirements are left out


def test_a_missing_distribution_fails_the_check(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert lease_env.main(["requirements", "pytest", "no-such-dist-cmd", "--json", str(path)]) == 1
    report = json.loads(path.read_text())
    assert report["ok"] is False and report["distributions"]["no-such-dist-cmd"]["installed"] is None
    assert "no-such-dist-cmd None: not installed" in capsys.readouterr().out


def test_env_stage_on_a_cpu_reports_versions_and_positive_ceilings(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the ceilings are cmd_kernels.bench.ceilings (the lease runs it)")
    path = tmp_path / "env.json"
    assert lease_env.main(["env", "--json", str(path)]) == 0
    env = json.loads(path.read_text())
    assert env["device_type"] == "cpu" and env["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["ceilings"]["copy_gbps"] > 0 and env["ceilings"]["matmul_tflops"] > 0
    assert "CPU" in env["ceilings"]["method"]
    from cmd_kernels.bench import read_ceilings  # the file the kernel benchmark stage reads them from

    assert read_ceilings(str(path)) == {k: env["ceilings"][k] for k in ("copy_gbps", "matmul_tflops")}
