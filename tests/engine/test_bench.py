"""engine.bench (latency, memory, flops) and engine.profile on a tiny random model."""

import json
import os

import pytest
import torch

from engine import bench, profile

TINY = "random:" + os.path.join(os.path.dirname(__file__), "tiny_config.json")
SMALL = ["--model", TINY, "--steps", "2", "--motion-steps", "2", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("fast_cpu")  # tests/engine/conftest.py


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_latency_reports_stages_per_backend(capsys):
    assert bench.main(["latency", *SMALL, "--backends", "eager", "--warmup", "1", "--iters", "2", "--batch", "2",
                       "--json"]) == 0
    out = capsys.readouterr().out
    report = _last_json(out)
    eager = report["backends"]["eager"]
    assert set(eager["stages_s"]) == {"text", "content", "motion", "decode", "total"}
    assert all(v > 0 for v in eager["stages_s"].values())
    assert eager["total_s"] >= eager["stages_s"]["content"] + eager["stages_s"]["motion"]
    assert eager["speedup_vs_eager"] == 1.0 and eager["psnr_vs_eager_db"] is None  # identical: inf -> null
    assert report["shape"] == {"batch": 2, "frames": 4, "height": 16, "width": 16, "steps": 2, "motion_steps": 2,
                               "scheduler": "ddim", "guidance": 3.0, "motion_guidance": 2.0}
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"] == torch.__version__
    assert "eager" in out.splitlines()[2]  # the table: header line, then one row per backend


def test_memory_reports_peak_rss_on_cpu(capsys):
    assert bench.main(["memory", *SMALL, "--backends", "eager", "--warmup", "0", "--json"]) == 0
    report = _last_json(capsys.readouterr().out)
    assert report["backends"]["eager"]["peak_rss_mb"] > 50  # torch alone is more than this


def test_flops_is_delegated_to_engine_flops(capsys):
    assert bench.main(["flops", "--config", "default", "--steps", "2", "--json"]) == 0
    assert isinstance(_last_json(capsys.readouterr().out), dict)


def test_bad_bench_input_is_one_line(capsys):
    assert bench.main(["latency", *SMALL, "--backends", "eager,warp"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown backend 'warp'; choose from compile, cudagraph, eager, onnxruntime, tensorrt"
    if not torch.cuda.is_available():
        assert bench.main(["latency", *SMALL, "--backends", "cudagraph"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def test_profile_writes_a_chrome_trace_with_the_stage_and_step_ranges(tmp_path, capsys):
    out_dir = tmp_path / "prof"
    assert profile.main([*SMALL, "--warmup", "0", "--out-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    trace = json.loads((out_dir / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"text", "content", "motion", "decode", "content step 0", "motion step 1"} <= names
    assert "aten::" in (out_dir / "ops.txt").read_text()
    assert "nsys profile" in out and "--capture-range=cudaProfilerApi" in out and "python -m engine.profile --nsys" in out
    assert [line.split()[0] for line in out.splitlines()[2:7]] == ["text", "content", "motion", "decode", "total"]
    assert sorted(os.listdir(out_dir)) == ["ops.txt", "trace.json"]


def test_bench_cache_reads_a_prompts_file(tmp_path, capsys):
    """Prompts from a file are its lines' text (each setting's requests validated once, then run per batch)."""
    prompts = ["a red circle moving right", "a blue square moving up", "a white triangle moving left"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    assert bench.main(["cache", *SMALL, "--prompts-file", str(tmp_path / "prompts.txt"), "--settings",
                       "none,none@0.5-1", "--batch", "2", "--json"]) == 0
    report = _last_json(capsys.readouterr().out)
    assert report["shape"]["videos"] == 3 and report["shape"]["steps"] == 2
    fewer = report["settings"]["none@0.5-1"]["evaluations_per_video"]
    assert report["settings"]["none"]["evaluations_per_video"]["content"] == 4  # 2 steps x CFG pair
    assert fewer["content"] == 3  # CFG on the second step only
