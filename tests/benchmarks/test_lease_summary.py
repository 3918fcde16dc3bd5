"""benchmarks/lease_summary.py on stage outputs shaped as a GPU run leaves them (fresh random figures each
run): every figure lands beside its target with the right verdict, cut stages still report what ended, and
the Triton cache lookups are attributed per stage."""

import json
import random
import tarfile

import pytest

from benchmarks import lease_summary
from benchmarks.targets import KERNEL_TARGETS, PAPER_TARGETS, check_paper


@pytest.fixture
def rng():
    return random.Random()


def write_stage(work, name, kind, status="ok", rc=0, seconds=10, limit=100, tune="off", log="", result=None,
                suffix="json"):
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "results").mkdir(parents=True, exist_ok=True)
    with open(work / "stages.tsv", "a") as f:
        f.write("\t".join(map(str, (name, kind, status, rc, seconds, limit, tune))) + "\n")
    (work / "logs" / f"{name}.log").write_text(log)
    if result is not None:
        text = result if isinstance(result, str) else json.dumps(result)
        (work / "results" / f"{name}.{suffix}").write_text(text)


def paper_report(rng):
    graph = round(rng.uniform(0.5, 1.5), 4)
    eager = round(graph * rng.uniform(1.5, 3.5), 4)
    base = round(graph * rng.uniform(8, 25), 4)
    stages = lambda t: {"text": 0.01, "content": t * 0.7, "motion": t * 0.25, "decode": t * 0.04}  # noqa: E731
    peak = round(rng.uniform(2.0, 6.0), 3)
    return {"environment": {"device": "NVIDIA H200", "device_type": "cuda"},
            "settings": {"dtype": "bfloat16", "steps": 50, "motion_steps": 50, "guidance": 7.5, "repeats": 2,
                         "batch_sizes": [1]},
            "config": {"name": "sd21-512x1024", "num_frames": 16, "height": 512, "width": 1024},
            "runs": [{"backend": "eager", "batch": 1, "latency_s": eager, "stages_s": stages(eager),
                      "peak_reserved_gb": peak + 0.1, "peak_allocated_gb": peak},
                     {"backend": "cudagraph", "batch": 1, "latency_s": graph, "stages_s": stages(graph),
                      "peak_reserved_gb": peak, "peak_allocated_gb": peak - 1.5}],
            "best_backend": "cudagraph",
            "speedup": {"vs_eager": round(eager / graph, 4), "vs_baseline": round(base / graph, 4)},
            "baseline": {"name": "UNet3D", "size": "full", "runs": [{"frames": 16, "batch": 1, "latency_s": base,
                                                                     "peak_reserved_gb": 9.0}]},
            "vae_decode": {"latency_s": 0.2}, "scaling": [],
            "vs_eager_output": {"cudagraph": {"psnr_db": None, "identical": True, "max_abs_diff": 0.0}}}


def bench_report(rng):
    ceil = {"name": "ceilings", "copy_gbps": 4300.0, "matmul_tflops": 780.0}
    checks = [{"name": n, "pass": "forward", "dtype": "bfloat16", "ok": True, "rel_err": 1e-3}
              for n in ("content_frame", "decoder_fusion", "motion_attention")]
    checks.append({"name": "modulated_layernorm", "pass": "backward", "dtype": "float32", "ok": False, "rel_err": 0.1})
    def timing(name, **kw):
        return dict({"name": name, "shape": [2, 16, 512, 72], "dtype": "bfloat16", "median_ms": 0.05, "pct_bw": None,
                     "pct_peak": None, "tflops": None, "speedup_vs_eager": 2.0}, **kw)

    rows = [ceil] + checks + [
        timing("content_frame", **{"pct_bw": rng.uniform(70, 95)}),
        timing("content_frame_backward", **{"pct_bw": rng.uniform(50, 95)}),
        timing("decoder_fusion", **{"pct_bw": rng.uniform(70, 95)}),
        timing("motion_attention", **{"tflops": 300.0, "pct_peak": 38.0, "sdpa_flash_ms": 0.06, "sdpa_math_ms": None,
                                      "sdpa_best_ms": 0.06, "speedup_vs_sdpa_best": rng.uniform(0.6, 1.4)}),
        timing("dit_attention_half", **{"tflops": 300.0, "pct_peak": 38.0}),
    ]
    rows[-1]["speedup_vs_eager"] = rng.uniform(0.9, 1.8)
    return {"environment": {}, "rows": rows}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="3" time="12.5"><testcase classname="tests.cmd_kernels.test_x" name="test_ok[bf16]" time="0.1"/>
<testcase classname="tests.cmd_kernels.test_x" name="test_bad[bf16]" time="0.1"><failure
message="assert 0.5 &lt;= 0.01&#10;second line">trace</failure></testcase><testcase classname="tests.cmd_kernels.test_x" name="test_skip" time="0">
<skipped message="no"/></testcase></testsuite></testsuites>"""


def test_gpu_shaped_run_is_judged_against_the_targets(tmp_path, rng):
    work, out = tmp_path / "work", tmp_path / "out"
    write_stage(work, "setup", "setup", tune="-", result={
        "wheels": ["diffusers-0.42.1-py3-none-any.whl"], "wheels_rc": 0, "requirements": {"ok": True, "distributions": {}},
        "cache_check": "ok: 40 kernels", "cache_fits": True, "carried_entries": 1})
    (work / "results" / "carried-entries.txt").write_text("CARRIED1\n")
    write_stage(work, "env", "env", tune="-", result={
        "device": "NVIDIA H200", "device_type": "cuda", "capability": "9.0", "sms": 132, "memory_gb": 143.8,
        "driver": "580.159.04", "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0", "python": "3.12.3",
        "numpy": "2.5.2", "diffusers": "0.42.1", "git_rev": "abc", "nvidia_smi": None,
        "ceilings": {"copy_gbps": 4300.0, "matmul_tflops": 780.0}})
    write_stage(work, "kernel_tests", "pytest", log="$ python3 -m pytest tests/cmd_kernels\n", result=JUNIT, suffix="xml")
    paper = paper_report(rng)
    write_stage(work, "paper_scale", "paper_scale", tune="full", result=paper)
    bench = bench_report(rng)
    write_stage(work, "kernel_bench", "kernel_bench", tune="full", result=bench)
    # Cut by its limit before pytest wrote the XML: the counts come from its last summary line.
    write_stage(work, "engine_tests", "pytest", status="timed out", rc=124, limit=75,
                log="..F\n!!! KeyboardInterrupt !!!\n2 passed, 1 failed in 70.1s\n")
    partial = {"backend": "cudagraph", "batch": 4, "frames": 16, "latency_s": 2.5}
    write_stage(work, "extra_scaling", "paper_scale", status="timed out", rc=124,
                log=f"[cmd] backend cudagraph, batch 4\n[result] {json.dumps(partial)}\n[cmd] x\nKeyboardInterrupt\n")
    write_stage(work, "extra_compile", "paper_scale", status="skipped", rc="-", seconds=0, limit=4)
    (work / "cache.log").write_text(
        "kernel_tests\thit\t_attention_fwd_kernel\tCARRIED1\n"
        "kernel_tests\tmiss\t_content_frame_fwd_kernel\tNEW1\n"
        "kernel_tests\thit\t_content_frame_fwd_kernel\tNEW1\n"
        "extra_compile\tmiss\ttriton_poi_fused_add_0\tNEW2\n")

    report = lease_summary.collect(work, out, budget_s=540, elapsed_s=500)
    assert sorted(p.name for p in out.iterdir()) == ["lease.json", "lease.log", "raw.tar.gz", "summary.md"]
    assert json.loads((out / "lease.json").read_text())["rows"] == report["rows"]
    rows = {(r["stage"], r["figure"]): r for r in report["rows"]}

    def row(stage, start):
        hits = [r for (s, f), r in rows.items() if s == stage and f.startswith(start)]
        assert len(hits) == 1, (stage, start, list(rows))
        return hits[0]

    # Paper scale: each figure against targets.py, the verdict as the target's rule says.
    figures = check_paper(paper)
    for key, label in [("latency_s", "latency per video"), ("speedup_vs_eager", "speedup over eager"),
                       ("speedup_vs_baseline", "speedup over the UNet3D"), ("peak_gb_batch1", "peak memory")]:
        r = row("paper_scale", label)
        rule, target = PAPER_TARGETS[key]
        value = figures[key]["measured"]
        assert r["met"] is (value <= target if rule == "<=" else value >= target)
        assert r["target"].startswith(f"{rule} {target:g}")
    assert row("paper_scale", "output of cudagraph")["measured"] == "identical"
    assert row("paper_scale", "cudagraph, batch 1")["measured"].startswith("text ")

    # Kernels: % of bandwidth and speedups against issue 3's targets.
    timings = {x["name"]: x for x in bench["rows"] if "median_ms" in x}
    for name, (field, rule, goal) in KERNEL_TARGETS.items():
        r = row("kernel_bench", f"{name} (")
        assert r["met"] is (timings[name][field] >= goal), (name, timings[name][field], r)
    assert row("kernel_bench", "content_frame_backward")["met"] is None  # no target: reported only
    correctness = row("kernel_bench", "correctness")
    assert correctness["met"] is False and "3/4" in correctness["measured"] and "modulated_layernorm" in correctness["measured"]

    tests = row("kernel_tests", "kernel tests")
    assert tests["met"] is False and "1 passed, 1 failed" in tests["measured"] and "test_bad[bf16]" in tests["measured"]
    failures = report["stages"][2]["result"]["failures"]
    assert failures == [{"test": "tests.cmd_kernels.test_x::test_bad[bf16]", "kind": "failure", "message": "assert 0.5 <= 0.01"}]
    engine = row("engine_tests", "engine gpu tests")
    assert engine["met"] is False and "2 passed, 1 failed" in engine["measured"]
    assert "TIMED OUT in 10 s (limit 75 s)" in row("engine_tests", "stage")["measured"]
    assert row("extra_scaling", "measurements that ended")["measured"] == json.dumps(partial)
    assert row("extra_compile", "stage")["met"] is None and "not run" in row("extra_compile", "stage")["measured"]
    assert row("setup", "Triton cache carried")["met"] is True and row("setup", "wheels installed")["met"] is True

    # Cache: one carried hit, one compile (then a hit of it) of ours in kernel_tests; inductor's apart.
    lookups = row("triton cache", "kernel_tests")["measured"]
    assert lookups.startswith("1 hits of the prepared cache, 1 hits of this run's compiles, 1 compiled here "
                              "(_content_frame_fwd_kernel)")
    assert "other kernels (inductor): 0 hits, 1 compiled" in row("triton cache", "extra_compile")["measured"]
    total = row("triton cache", "our kernels compiled")
    assert total["met"] is False and total["measured"].startswith("1 of 3 lookups")

    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(report["rows"])  # the header, then one line per row
    assert "NVIDIA H200" in summary and "Triton 3.6.0" in summary and "driver 580.159.04" in summary
    assert "kernel_tests off, paper_scale full" in summary
    with tarfile.open(out / "raw.tar.gz") as tar:
        assert {"results/paper_scale.json", "results/kernel_tests.xml", "logs/engine_tests.log",
                "cache.log"} <= set(tar.getnames())


def test_our_kernel_names_are_the_jit_functions_of_kernels():
    names = lease_summary.our_kernel_names()
    assert {"_attention_fwd_kernel", "_content_frame_fwd_kernel", "_decoder_fusion_bwd_kernel"} <= set(names)
    assert not [n for n in names if n.startswith("triton_")]  # inductor's names never count as ours


def test_collect_on_an_empty_work_folder_still_writes_the_four_files(tmp_path):
    report = lease_summary.collect(tmp_path / "work", tmp_path / "out")
    assert report["stages"] == [] and (tmp_path / "out" / "summary.md").read_text().startswith("# GPU lease summary")


def test_note_merges_keys_as_json_or_text(tmp_path):
    path = tmp_path / "s.json"
    assert lease_summary.main(["note", str(path), "a=1", "b=true", 'c="x"', "d=plain text", "e={\"k\": [1]}"]) == 0
    assert lease_summary.main(["note", str(path), "a=2"]) == 0
    assert json.loads(path.read_text()) == {"a": 2, "b": True, "c": "x", "d": "plain text", "e": {"k": [1]}}
    assert lease_summary.main(["note", str(path), "novalue"]) == 2
    assert json.loads(path.read_text())["a"] == 2  # the bad call changed nothing
