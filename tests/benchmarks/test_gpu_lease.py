"""benchmarks/gpu_lease.sh end to end on this CPU (--dry-run): every stage runs with tiny configs and
interpreted kernels and leaves its result, so the script that runs on a rare GPU lease cannot break unseen."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_lease.sh"
# The plan's order: the never-run correctness tests first; extra_compile only when LEASE_STAGES names it.
DEFAULT_STAGES = ["setup", "env", "engine_tests", "kernel_tests", "paper_scale", "kernel_bench", "extra_scaling"]
STAGES = DEFAULT_STAGES + ["extra_compile"]


def lease(*args, env=None, timeout=3300):
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    full.update(LEASE_PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_runs_every_stage_and_summarises(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # extra_compile (inductor on the CPU takes far longer) gets 3 s: the cut must be recorded, not fatal.
    proc = lease("--dry-run", str(out), env={"LEASE_WORK": str(work), "LEASE_LIMIT_extra_compile": "3",
                                             "LEASE_STAGES": ",".join(STAGES)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # What comes back from a device call: at most 8 files; these four.
    assert sorted(p.name for p in out.iterdir()) == ["lease.json", "lease.log", "raw.tar.gz", "summary.md"]
    report = json.loads((out / "lease.json").read_text())
    assert report["mode"] == "dry-run"
    stages = {s["name"]: s for s in report["stages"]}
    assert [s["name"] for s in report["stages"]] == STAGES
    assert {n: s["status"] for n, s in stages.items()} == dict.fromkeys(STAGES[:-1], "ok") | {"extra_compile": "timed out"}
    # 124: ended by the SIGINT at the limit; 137: killed 15 s later (a loaded machine may not wind down sooner)
    assert stages["extra_compile"]["rc"] in (124, 137) and stages["extra_compile"]["limit_s"] == 3

    setup = stages["setup"]["result"]
    assert setup["requirements"]["ok"] is True and "diffusers" in setup["requirements"]["distributions"]
    assert setup["cache_fits"] is None and "dry run" in setup["cache_check"]
    env = stages["env"]["result"]
    assert env["device_type"] == "cpu" and env["ceilings"]["copy_gbps"] > 0 and env["ceilings"]["matmul_tflops"] > 0
    assert env["triton_interpret"] == "1" and env["triton_cache_dir"] == str(work / "triton-cache")
    tests = stages["kernel_tests"]["result"]
    assert tests["source"] == "junit" and tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    assert stages["kernel_tests"]["autotune"] == "off" and stages["engine_tests"]["autotune"] == "off"
    assert any("pytest" in c and "--junitxml" in c for c in stages["kernel_tests"]["commands"])
    paper = stages["paper_scale"]["result"]
    assert [(r["backend"], r["batch"]) for r in paper["runs"]] == [("eager", 1)]  # cudagraph needs CUDA
    assert paper["scaling"] == [] and paper["baseline"]["runs"][0]["latency_s"] > 0  # --no-scaling; baseline on
    assert paper["settings"]["steps"] == 1 and paper["config"]["name"] == "tiny-test"
    bench = stages["kernel_bench"]["result"]
    checks = [r for r in bench["rows"] if "ok" in r]
    assert checks and all(r["ok"] for r in checks)
    engine = stages["engine_tests"]["result"]
    assert engine["skipped"] > 0 and engine["passed"] == engine["failed"] == 0  # gpu-only: skipped on a CPU
    extra = stages["extra_scaling"]["result"]
    assert [r["frames"] for r in extra["scaling"]] == [8] and extra["runs"][0]["batch"] == 2
    assert stages["extra_compile"]["result"] is None
    assert "vae_decode" not in extra or extra["vae_decode"] is None  # --skip-vae: timed once, in paper_scale

    summary = (out / "summary.md").read_text()
    assert "| stage | figure | measured | target | met |" in summary
    for name in STAGES:
        assert f"| {name} | stage |" in summary
    assert "TIMED OUT" in summary and "n/a: targets are for a GPU" in summary
    row = next(r for r in report["rows"] if r["stage"] == "kernel_tests" and r["figure"] != "stage")
    assert row["met"] is True and f"{tests['passed']} passed" in row["measured"]
    log = (out / "lease.log").read_text()
    assert all(f"===== {name}:" in log for name in STAGES)
    with tarfile.open(out / "raw.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"results/paper_scale.json", "results/kernel_bench.json", "results/kernel_tests.xml", "results/env.json",
            "logs/extra_compile.log", "stages.tsv"} <= names


def test_plan_fits_the_budget_correctness_tests_first():
    proc = lease("--plan", timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    names = [line.split()[0] for line in lines[1:-1]]
    assert names == STAGES
    limits = {line.split()[0]: int(line.split()[2]) for line in lines[1:-1]}
    defaults = [n for n in STAGES if line_default(lines, n)]
    assert defaults == DEFAULT_STAGES and sum(limits[n] for n in defaults) <= 540
    assert names.index("engine_tests") < names.index("kernel_bench") and names.index("engine_tests") < names.index(
        "paper_scale")
    assert lines[-1] == f"default stages: {sum(limits[n] for n in defaults)} s of the 540 s budget"


def line_default(lines, name):
    return next(line for line in lines[1:-1] if line.split()[0] == name).split()[-1] == "1"


def test_setup_fails_without_wheels_and_blocks_the_engine_stages(tmp_path):
    """A real (not dry) run without .lease/wheels: setup fails and the stages that import the engine are
    recorded as blocked, not run; the kernel stages still run (here: cut to 1 s)."""
    out, work, lease_dir = tmp_path / "out", tmp_path / "work", ROOT / ".lease" / "wheels"
    if lease_dir.is_dir() and any(lease_dir.glob("*.whl")):
        pytest.skip(".lease/wheels exists in this checkout")
    limits = {f"LEASE_LIMIT_{n}": "1" for n in ("env", "kernel_tests", "kernel_bench")}
    proc = lease(str(out), env={"LEASE_WORK": str(work), "LEASE_LIMIT_setup": "240", **limits}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = {s["name"]: s for s in json.loads((out / "lease.json").read_text())["stages"]}
    assert stages["setup"]["status"] == "failed"
    assert {n: stages[n]["status"] for n in ("engine_tests", "paper_scale", "extra_scaling")} == \
        dict.fromkeys(("engine_tests", "paper_scale", "extra_scaling"), "blocked")
    assert stages["kernel_tests"]["status"] != "blocked" and "extra_compile" not in stages
    summary = (out / "summary.md").read_text()
    assert "not run: setup failed" in summary


@pytest.mark.parametrize("args, message", [
    ([], "expected OUT, --dry-run OUT, --prepare, --plan or --rehearse [OUT]"),
    (["--dry-run"], "usage: bash benchmarks/gpu_lease.sh --dry-run OUT"),
    (["--prepare", "extra"], "--prepare takes no other argument"),
    (["--plan", "extra"], "--plan takes no other argument"),
    (["--bogus"], "got '--bogus'"),
])
def test_bad_usage_is_one_error_line_and_exit_2(args, message, tmp_path):
    proc = lease(*args, env={"LEASE_WORK": str(tmp_path / "work")}, timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "work").exists()  # nothing ran
