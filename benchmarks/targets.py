"""The performance targets the GPU figures are judged against, and the figures they apply to.

Plain data and dict arithmetic (no torch), shared by ``benchmarks/paper_scale.py`` (which writes the
check into its report) and ``benchmarks/lease_summary.py`` (the GPU lease's table).

- Issue 8 (paper scale, H100/H200, bf16, 50 + 50 steps, CFG on, image VAE decode excluded): <= 1.0 s per
  16x512x1024 video, >= 2.5x our eager path and >= 15x the UNet3D baseline in the same run, peak memory
  <= 4.0 GB at batch 1 and <= 8.0 GB at batch 4, judged on peak *reserved* memory (what CUDA graphs keep in
  their private pools counts, as eager's activations do: :mod:`engine.memory`).
- Issue 3 (kernels at ``sd21-512x1024`` shapes): content_frame >= 85% and decoder_fusion >= 80% of the
  measured copy bandwidth; motion attention (512 tokens, 16 heads, head dim 72) >= 1.0x the best SDPA
  backend; the attention half of a DiT block (prologue + qkv + attention + proj) >= 1.3x the eager block.
"""

from typing import Dict, Optional, Tuple

# key: (rule, target). "<=": lower is better.
PAPER_TARGETS: Dict[str, Tuple[str, float]] = {
    "latency_s": ("<=", 1.0),
    "speedup_vs_eager": (">=", 2.5),
    "speedup_vs_baseline": (">=", 15.0),
    "peak_gb_batch1": ("<=", 4.0),
    "peak_gb_batch4": ("<=", 8.0),
}

# cmd_kernels.bench row name: (row field, rule, target)
KERNEL_TARGETS: Dict[str, Tuple[str, str, float]] = {
    "content_frame": ("pct_bw", ">=", 85.0),
    "decoder_fusion": ("pct_bw", ">=", 80.0),
    "motion_attention": ("speedup_vs_sdpa_best", ">=", 1.0),
    "dit_attention_half": ("speedup_vs_eager", ">=", 1.3),
}


def meets(value: Optional[float], rule: str, target: float) -> Optional[bool]:
    """Whether ``value`` meets ``rule target`` (None when there is no value)."""
    if value is None:
        return None
    return value <= target if rule == "<=" else value >= target


def paper_figures(report: dict) -> Dict[str, Optional[float]]:
    """The figures of a ``benchmarks/paper_scale.py`` report that :data:`PAPER_TARGETS` apply to: the best
    backend's latency and peak reserved memory at batch 1 (and 4), its speedup over eager and over the
    baseline (as the report computed them, in the same run). None where the run did not measure it."""
    best = report.get("best_backend")
    runs = {(r["backend"], r["batch"]): r for r in report.get("runs", [])}
    b1, b4 = runs.get((best, 1)), runs.get((best, 4))
    speedup = report.get("speedup", {})
    return {"latency_s": b1["latency_s"] if b1 else None,
            "speedup_vs_eager": speedup.get("vs_eager"),
            "speedup_vs_baseline": speedup.get("vs_baseline"),
            "peak_gb_batch1": _peak(b1),
            "peak_gb_batch4": _peak(b4)}


def _peak(run: Optional[dict]) -> Optional[float]:
    """A run's peak memory as the targets judge it: reserved (CUDA graphs' pools included, engine.memory);
    a report from before reserved was recorded has none to judge."""
    return run.get("peak_reserved_gb") if run else None


def check_paper(report: dict) -> dict:
    """Each paper target beside the report's figure: {key: {target, rule, measured, met}}."""
    figures = paper_figures(report)
    return {key: {"target": target, "measured": figures[key], "met": meets(figures[key], rule, target),
                  "rule": rule} for key, (rule, target) in PAPER_TARGETS.items()}
