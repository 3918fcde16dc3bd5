"""benchmarks/paper_scale.py pieces the GPU lease uses: --no-scaling, the output comparison against
eager (PSNR over the reference's value range), the targets of benchmarks/targets.py."""

import importlib.util
import math
import random
from pathlib import Path

import pytest
import torch

from benchmarks.targets import PAPER_TARGETS, check_paper

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def paper_scale():
    spec = importlib.util.spec_from_file_location("paper_scale", ROOT / "benchmarks" / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_scaling_empties_the_frame_list(paper_scale):
    assert paper_scale.parse_args(["--no-scaling", "--frames", "32"]).frames == []
    assert paper_scale.parse_args(["--frames", "32,64"]).frames == [32, 64]


def test_compare_outputs_is_psnr_over_the_reference_range(paper_scale):
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    ref = torch.randn(1, 16, 4, 8, 8, generator=g) * 3  # latents: not in [0, 1]
    same = paper_scale.compare_outputs(ref.clone().bfloat16().float(), ref.bfloat16().float())
    assert same == {"psnr_db": None, "identical": True, "max_abs_diff": 0.0}
    noise = torch.randn(ref.shape, generator=g) * 1e-2
    got = paper_scale.compare_outputs(ref + noise, ref)
    span = (ref.max() - ref.min()).double()
    want = 10 * math.log10(1.0 / float(((noise.double() / span) ** 2).mean()))
    assert got["identical"] is False and got["psnr_db"] == pytest.approx(want, rel=1e-3)
    assert got["max_abs_diff"] == pytest.approx(float(noise.abs().max()), rel=1e-3)


def test_check_targets_follows_the_rules_and_stays_off_cpu_runs(paper_scale):
    rng = random.Random()
    lat, eager, base, peak = rng.uniform(0.5, 1.5), rng.uniform(1, 4), rng.uniform(5, 30), rng.uniform(2, 6)
    report = {"environment": {"device_type": "cuda"}, "config": {"num_frames": 16}, "best_backend": "cudagraph",
              # judged on reserved (CUDA graphs' pools count); allocated, lower, must not be what is judged
              "runs": [{"backend": "cudagraph", "batch": 1, "latency_s": lat, "peak_reserved_gb": peak,
                        "peak_allocated_gb": peak / 4},
                       {"backend": "cudagraph", "batch": 4, "latency_s": 4 * lat, "peak_reserved_gb": 2 * peak,
                        "peak_allocated_gb": peak / 2}],
              "speedup": {"vs_eager": eager, "vs_baseline": base}}
    targets = paper_scale.check_targets(report)
    assert targets == dict(check_paper(report), frames=16)
    want = {"latency_s": lat <= 1.0, "speedup_vs_eager": eager >= 2.5, "speedup_vs_baseline": base >= 15.0,
            "peak_gb_batch1": peak <= 4.0, "peak_gb_batch4": 2 * peak <= 8.0}
    assert {k: targets[k]["met"] for k in PAPER_TARGETS} == want
    assert targets["peak_gb_batch4"]["measured"] == 2 * peak and targets["latency_s"]["rule"] == "<="
    report["environment"]["device_type"] = "cpu"
    assert paper_scale.check_targets(report) is None
