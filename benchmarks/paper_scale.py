"""Paper-scale benchmark (issue 8): CMD against the ModelScope UNet3D baseline, in one run.

Random weights (text encoder included), bf16, 50 content + 50 motion steps, classifier-free guidance
on, one 16x512x1024 video (``sd21-512x1024``). Measured:

- latency and peak memory of the engine with each backend (eager, compile, cudagraph) at batch 1 and
  4, the image VAE decode excluded as in the paper (it is timed apart);
- the baseline: ModelScope's UNet3D (``engine.baseline``), DDIM with CFG, same latent size and steps;
- parameters per network; FLOPs (``engine.flops``, full accounting) and the TFLOP/s each stage reaches,
  against a bf16 matmul ceiling measured in the same run;
- frame-count scaling (16, 32, 64) per stage with the fastest backend (``--no-scaling``: none);
- the PSNR of each backend's output against eager's at the smallest batch (same seed, same inputs);
- the issue's targets (on CUDA): <= 1.0 s, >= 2.5x eager, >= 15x the baseline, <= 4.0 / 8.0 GB.

Writes ``<out>/<name>.json`` (raw), ``<name>.md`` (tables) and ``<name>.png`` (plots; only where
matplotlib is installed). Memory is peak *reserved* memory (:mod:`engine.memory`: CUDA graphs' private pools
count, which ``max_memory_allocated`` leaves out), with allocated beside it, in GB = 1e9 bytes, the CUDA
context not included; the memory targets are judged on reserved.

    python benchmarks/paper_scale.py                       # the GPU run: sd21-512x1024 on cuda, bf16
    python benchmarks/paper_scale.py --config default --steps 2 --device cpu --dtype float32 \\
        --backends eager --frames 16,32 --baseline-size tiny --repeats 1   # a smoke run on a CPU

Everything runs in one process (one run = one device, one set of versions). The whole default run
(baseline, three backends at two batch sizes, three frame counts, compilation included) has not been
timed on a GPU yet and may outlast a capped command: then split it with ``--backends``, ``--frames``,
``--batch-sizes``, ``--skip-baseline`` and ``--no-scaling`` (the JSON of each part lands beside the
others). On a borrowed GPU, ``benchmarks/gpu_lease.sh`` runs it in parts that fit a capped command (eager
and cudagraph at batch 1 with the baseline; then, as time allows, batch 4 with 32 and 64 frames, and the
compile backend), with diffusers carried as a wheel (the GPU machines lack it).
"""

import argparse
import gc
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: the packages live at the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from benchmarks.targets import check_paper  # noqa: E402
from engine.atomic import atomic_path, check_output, write_json, write_text  # noqa: E402
from engine.baseline import BASELINE_NAME, TEXT_TOKENS, build_baseline_unet, sample_baseline  # noqa: E402
from engine.cli import Int, Number, Parser, Seed, fail, parse_or_exit  # noqa: E402
from engine.configs import CMDConfig, load_config  # noqa: E402
from engine.geometry import ClipSize, check_fits  # noqa: E402
from engine.memory import peak_memory, reset_peak  # noqa: E402
from engine.flops import measure as measure_flops, summarize  # noqa: E402
from engine.models import CMDModel  # noqa: E402
from engine.pipeline import CMDPipeline  # noqa: E402
from engine.request import parse_device, parse_dtype  # noqa: E402
from engine.profiling import StageTimer  # noqa: E402
from engine.random_text import RandomTextEncoder  # noqa: E402
from cmd_kernels import measure  # noqa: E402
from cmd_kernels.measure import matmul_tflops, sync, wall_times  # noqa: E402

GB = 1e9
PROMPT = "a red panda climbing a snowy pine tree, cinematic lighting"
TIMED_STAGES = ("text", "content", "motion", "decode")
# A narrow UNet3D of the same block layout, for smoke runs on a CPU (the real one is 1.4B parameters).
TINY_BASELINE = {"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 8, "attention_head_dim": 4,
                 "cross_attention_dim": 64}


def _int_list(text: str) -> List[int]:
    positive = Int()
    try:
        values = [positive(v.strip()) for v in text.split(",") if v.strip()]
    except (ValueError, argparse.ArgumentTypeError):  # name the whole list, not one item of it
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of whole numbers >= 1, got {text!r}")
    return values


def _name_list(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="sd21-512x1024", help="config name or JSON file")
    p.add_argument("--steps", type=Int(), default=50, help="content steps (default 50)")
    p.add_argument("--motion-steps", type=Int(), default=None, help="motion steps (default: --steps)")
    p.add_argument("--guidance", type=Number(above=1.0), default=None, help="CFG scale, > 1 (default: the config's)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--backends", type=_name_list, default=["eager", "compile", "cudagraph"])
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 4])
    p.add_argument("--frames", type=_int_list, default=[16, 32, 64], help="frame counts for the scaling table")
    p.add_argument("--no-scaling", action="store_true", help="no frame-scaling table (--frames is ignored)")
    p.add_argument("--baseline-frames", type=_int_list, default=None,
                   help="frame counts for the baseline (default: the config's only)")
    p.add_argument("--baseline-size", choices=("full", "tiny"), default="full",
                   help="tiny: a narrow UNet3D for smoke runs (its numbers say nothing about ModelScope)")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--skip-vae", action="store_true",
                   help="do not time the image VAE decode apart (a run that measured it already)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the compile backend")
    p.add_argument("--repeats", type=Int(), default=3, help="timed runs per measurement (the median is reported)")
    p.add_argument("--warmup", type=Int(0), default=1, help="untimed runs first (compilation, graph capture)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON, table, plot")
    p.add_argument("--name", default=None, help="file stem (default: paper_scale-<device>-<UTC time>)")
    p.add_argument("--seed", type=Seed, default=0)
    args = parse_or_exit(p, argv)  # bad input: one line, exit 2
    try:
        check_output(args.out, folder=True)  # before the benchmark, not after it
    except ValueError as e:
        fail(str(e))
    args.motion_steps = args.motion_steps or args.steps
    if args.no_scaling:
        args.frames = []
    return args


# ------------------------------------------------------------------------------------------ helpers


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(run: Callable[[], Dict[str, float]], device: torch.device, repeats: int, warmup: int) -> dict:
    """Warm up, then ``repeats`` timed runs: median wall-clock latency (synchronised), median stage
    times (``run`` returns its per-stage seconds) and the peak memory over the timed runs."""
    for _ in range(warmup):
        run()
    sync(device)
    _free(device)  # cached blocks of earlier work (an fp32 build, other backends) must not count as reserved
    reset_peak(device)
    totals, stages = wall_times(run, device, repeats)
    names = [k for k in stages[0] if k != "total"]
    return {"latency_s": round(statistics.median(totals), 5), "latencies_s": [round(t, 5) for t in totals],
            "stages_s": {k: round(statistics.median(s[k] for s in stages), 5) for k in names}, **peak_memory(device)}


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> dict:
    """TFLOP/s of a large square matmul in ``dtype`` (:func:`cmd_kernels.measure.matmul_tflops`): the compute
    ceiling the stages are set against."""
    n = 8192 if device.type == "cuda" else 1024
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": _sig(matmul_tflops(device, dtype, n))}


def environment(device: torch.device) -> dict:
    """:func:`cmd_kernels.measure.environment` and the command line that ran."""
    return dict(measure.environment(device),
                command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]))


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _params(module: Optional[torch.nn.Module]) -> Optional[int]:
    return None if module is None else sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------- CMD


def _with_frames(cfg: CMDConfig, frames: int) -> CMDConfig:
    """The config for clips of ``frames`` frames: the networks do not depend on it (sin-cos positions),
    the sizes the model serves do (random weights: any size that fits the networks may be declared)."""
    return cfg.with_size(ClipSize(frames, cfg.height, cfg.width))


def cmd_run(pipe: CMDPipeline, batch: int, args, keep: Optional[dict] = None) -> Callable[[], Dict[str, float]]:
    """One batch of videos up to the AE decoder's output (the image VAE decode left out, as the paper
    does): the pipeline to the latents, then the backend's decoder. Returns seconds per stage. With
    ``keep``, ``keep["video"]`` holds the last run's decoder output (a reference: a CUDA graph's static
    output stays valid until its next replay; the previous output is freed as the next one is made, so
    it adds one decoded cube, 1 MB at paper scale, to the peak)."""
    prompts = [PROMPT] * batch
    request = pipe.check_inputs(batch, output_type="latent", num_inference_steps=args.steps,
                                motion_steps=args.motion_steps, guidance_scale=args.guidance,
                                motion_guidance_scale=args.guidance)  # validated once, run every time

    def run() -> Dict[str, float]:
        out = pipe.run(request, prompts, generator=args.seed, output_type="latent", progress=False)
        timer = StageTimer(pipe.device)
        with timer.stage("decode"):
            video = pipe.backend.decode(out.content.to(pipe.dtype), out.motion.to(pipe.dtype))
        if keep is not None:
            keep["video"] = video
        stages = {k: v for k, v in out.timings.items() if k != "total"}
        stages.update({k: v for k, v in timer.result().items() if k != "total"})
        return stages

    return run


def vae_apart(pipe: CMDPipeline, device: torch.device, args) -> Optional[dict]:
    """The image VAE decode of one video's frames (chunked as the pipeline does), which the paper's
    figures leave out: timed apart, on random latents of the video's shape (the cost does not depend
    on the values)."""
    if pipe.model.vae is None:
        return None
    from engine.models.vae import decode_frames

    geo = pipe.config.geometry()
    latents = torch.randn(1, geo.frames, *geo.content_shape, device=device, dtype=pipe.dtype)

    def run():
        decode_frames(pipe.model.vae, latents, chunk=pipe.vae_chunk)
        return {}

    result = timed(run, device, args.repeats, min(args.warmup, 1))
    result["chunk"] = pipe.vae_chunk
    return result


def compare_outputs(video: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far a backend's decoder output is from eager's for the same seed and inputs: PSNR in dB
    (``engine.bench.psnr`` after scaling both by the reference's value range, since the output is latents
    or pixels in [-1, 1], not frames in [0, 1]; null when identical), ``identical`` and the largest
    absolute difference."""
    from engine.bench import psnr

    video, reference = video.double().cpu(), reference.double().cpu()
    lo, hi = reference.min(), reference.max()
    span = (hi - lo).clamp_min(1e-12)
    db = psnr(((video - lo) / span).numpy(), ((reference - lo) / span).numpy())
    return {"psnr_db": _sig(db) if db != float("inf") else None, "identical": bool(torch.equal(video, reference)),
            "max_abs_diff": _sig(float((video - reference).abs().max()))}


def _achieved(result: dict, flops: dict, batch: int) -> None:
    """TFLOP/s per stage from the full-accounting FLOPs (with CFG) of one video times the batch."""
    per_stage = {"content": flops["cmd"]["content"], "motion": flops["cmd"]["motion"],
                 "decode": flops["cmd"]["decoder"]}
    result["tflops_per_s"] = {k: _sig(batch * v / result["stages_s"][k])
                              for k, v in per_stage.items() if result["stages_s"].get(k)}
    result["tflops_per_s"]["total"] = _sig(batch * flops["cmd"]["total"] / result["latency_s"])


# -------------------------------------------------------------------------------------- baseline


def baseline_run(unet, encoder, cfg: CMDConfig, frames: int, batch: int, guidance: float,
                 args) -> Callable[[], Dict[str, float]]:
    """The ModelScope-style loop for ``batch`` videos: text (prompts + empty negatives), then DDIM with CFG."""
    device = unet.device
    geo = cfg.geometry(ClipSize(frames, cfg.height, cfg.width))

    def run() -> Dict[str, float]:
        timer = StageTimer(device)
        with timer.stage("text"):
            states, _ = encoder([PROMPT] * batch + [""] * batch)
        with timer.stage("unet"):
            sample_baseline(unet, states[:batch], states[batch:], frames, geo.latent_height, geo.latent_width,
                            steps=args.steps, guidance_scale=guidance,
                            generator=torch.Generator().manual_seed(args.seed))
        return {k: v for k, v in timer.result().items() if k != "total"}

    return run


def bench_baseline(cfg: CMDConfig, device, dtype, guidance: float, flops_by_frames: dict, args) -> dict:
    overrides = TINY_BASELINE if args.baseline_size == "tiny" else {}
    torch.manual_seed(args.seed)
    unet = build_baseline_unet(in_channels=cfg.channels, device=device, dtype=dtype, **overrides).eval()
    encoder = RandomTextEncoder(unet.config.cross_attention_dim, TEXT_TOKENS).to(device)
    out = {"name": BASELINE_NAME, "size": args.baseline_size, "params": _params(unet), "runs": []}
    with torch.no_grad():
        for frames in args.baseline_frames or [cfg.num_frames]:
            print(f"[baseline] {frames} frames, batch 1", flush=True)
            result = timed(baseline_run(unet, encoder, cfg, frames, 1, guidance, args), device, args.repeats,
                           args.warmup)
            result.update(frames=frames, batch=1)
            print("[result] " + json.dumps({"baseline": BASELINE_NAME, "frames": frames, "latency_s": result["latency_s"],
                                            "peak_reserved_gb": result["peak_reserved_gb"]}), flush=True)
            flops = flops_by_frames.get(frames)
            if flops is not None and args.baseline_size == "full":
                result["tflops_per_s"] = {"total": _sig(flops["baseline"]["total"] / result["latency_s"])}
            out["runs"].append(result)
    del unet, encoder
    _free(device)
    return out


# ------------------------------------------------------------------------------------------ main


def check_targets(report: dict) -> Optional[dict]:
    """The issue's targets (``benchmarks/targets.py``) against this run's numbers; None off CUDA (they are
    H100 targets)."""
    if report["environment"]["device_type"] != "cuda":
        return None
    return dict(check_paper(report), frames=report["config"]["num_frames"])


def format_tables(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Paper-scale benchmark: {report['config']['name']}",
             "",
             f"{env['device']}; torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, diffusers "
             f"{env['diffusers']}; git {env['git_rev']}; {env['utc']}",
             f"`{env['command']}`",
             "",
             f"{report['settings']['dtype']}, {report['settings']['steps']} content + "
             f"{report['settings']['motion_steps']} motion steps, CFG {report['settings']['guidance']}, random "
             f"weights; image VAE decode excluded (timed apart). Median of {report['settings']['repeats']} runs. "
             f"Matmul ceiling: {report['ceiling']['tflops']} TFLOP/s ({report['ceiling']['dtype']}).",
             "",
             "| run | batch | latency s | text | content | motion | decode | peak reserved GB | peak alloc GB "
             "| TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, digits=3):
        return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)

    for r in report["runs"]:
        s = r["stages_s"]
        lines.append(f"| CMD {r['backend']} | {r['batch']} | {fmt(r['latency_s'])} | "
                     + " | ".join(fmt(s.get(k)) for k in TIMED_STAGES)
                     + f" | {fmt(r['peak_reserved_gb'])} | {fmt(r['peak_allocated_gb'])} | "
                       f"{fmt(r.get('tflops_per_s', {}).get('total'))} |")
    if report.get("baseline"):
        for r in report["baseline"]["runs"]:
            lines.append(f"| {report['baseline']['name']} ({report['baseline']['size']}, {r['frames']} frames) | "
                         f"{r['batch']} | {fmt(r['latency_s'])} | {fmt(r['stages_s'].get('text'))} | "
                         f"{fmt(r['stages_s'].get('unet'))} (UNet3D loop) | - | - | {fmt(r['peak_reserved_gb'])} | "
                         f"{fmt(r['peak_allocated_gb'])} | {fmt(r.get('tflops_per_s', {}).get('total'))} |")
    if report.get("vae_decode"):
        v = report["vae_decode"]
        lines.append(f"| image VAE decode (apart) | 1 | {fmt(v['latency_s'])} | | | | | "
                     f"{fmt(v['peak_reserved_gb'])} | {fmt(v['peak_allocated_gb'])} | |")
    speedup = report["speedup"]
    lines += ["", f"Best backend: {report['best_backend']}; speedup vs eager {fmt(speedup.get('vs_eager'))}x, "
                  f"vs baseline {fmt(speedup.get('vs_baseline'))}x.",
              "", "Parameters (M): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in report["params"].items()
                                                if v is not None)]
    for backend, c in report.get("vs_eager_output", {}).items():
        lines.append("")
        lines.append(f"Output of {backend} vs eager (same seed): PSNR "
                     f"{'identical' if c['identical'] else fmt(c['psnr_db']) + ' dB'}, max |diff| {fmt(c['max_abs_diff'])}.")
    if report["scaling"]:
        lines += ["", f"Frame scaling ({report['scaling_backend']}, batch 1), seconds per stage:", "",
                  "| frames | latency s | " + " | ".join(TIMED_STAGES) + " | peak reserved GB | TFLOPs (full) |",
                  "|---|---|" + "---|" * len(TIMED_STAGES) + "---|---|"]
    for r in report["scaling"]:
        lines.append(f"| {r['frames']} | {fmt(r['latency_s'])} | "
                     + " | ".join(fmt(r["stages_s"].get(k)) for k in TIMED_STAGES)
                     + f" | {fmt(r['peak_reserved_gb'])} | {fmt(r.get('tflops'))} |")
    if report.get("targets"):
        lines += ["", "| target | rule | measured | met |", "|---|---|---|---|"]
        for key, t in report["targets"].items():
            if isinstance(t, dict):
                lines.append(f"| {key} | {t['rule']} {t['target']} | {fmt(t['measured'])} | {t['met']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Optional[str]:
    """Latency per run and per-stage frame scaling as a PNG; None (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, values = [], []
    for r in report["runs"]:
        labels.append(f"CMD {r['backend']}\nbatch {r['batch']}")
        values.append(r["latency_s"])
    for r in (report.get("baseline") or {}).get("runs", []):
        labels.append(f"UNet3D\n{r['frames']} fr")
        values.append(r["latency_s"])
    colors = ["tab:blue"] * len(report["runs"]) + ["tab:red"] * (len(values) - len(report["runs"]))
    left.bar(range(len(values)), values, color=colors)
    left.set_xticks(range(len(values)), labels, fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("seconds per video batch (VAE excluded)")
    left.set_title(f"{report['environment']['device']}, {report['settings']['dtype']}")
    if not report["scaling"]:  # --no-scaling
        right.set_visible(False)
    frames = [r["frames"] for r in report["scaling"]]
    bottom = [0.0] * len(frames)
    for stage in TIMED_STAGES:
        heights = [r["stages_s"].get(stage, 0.0) for r in report["scaling"]]
        right.bar([str(f) for f in frames], heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    right.set_xlabel("frames")
    right.set_ylabel("seconds (batch 1)")
    right.set_title(f"frame scaling per stage ({report['scaling_backend']})")
    if report["scaling"]:
        right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return str(path)


def check_run_args(args) -> tuple:
    """(device, dtype, config, backends to run) from the arguments; bad ones end the run with one line
    (exit 2) before any work. Sets ``args.guidance`` to the config's where not given."""
    try:
        device, dtype = parse_device(args.device), parse_dtype(args.dtype)
        cfg = load_config(args.config)
    except ValueError as e:
        fail(str(e))
    guidance = cfg.sampling.guidance if args.guidance is None else args.guidance
    if guidance <= 1.0:
        fail(f"--guidance must be > 1 (this benchmark measures CFG sampling), got {guidance}")
    args.guidance = guidance
    for frames in args.frames + (args.baseline_frames or []):
        try:
            check_fits(cfg, ClipSize(frames, cfg.height, cfg.width))
        except ValueError as e:
            fail(f"frame count {frames}: {e}")
    unknown = [b for b in args.backends if b not in ("eager", "compile", "cudagraph")]
    if unknown:
        fail(f"unknown backend {unknown[0]!r}; choose from eager, compile, cudagraph")
    backends = [b for b in args.backends if not (b == "cudagraph" and device.type != "cuda")]
    for b in set(args.backends) - set(backends):
        print(f"[skip] backend {b!r} needs CUDA", flush=True)
    if not backends:
        fail("no backend left to run on this device")
    return device, dtype, cfg, backends


def count_flops(cfg, args) -> tuple:
    """FLOPs on the meta device per frame count (full accounting: what the GPU executes, CFG included), and
    the paper's accounting at the config's frame count: (by frames, paper)."""
    frame_counts = sorted(set(args.frames) | {cfg.num_frames} | set(args.baseline_frames or []))
    flops_by_frames, flops_paper = {}, None
    for frames in frame_counts:
        costs = measure_flops(cfg, frames)
        flops_by_frames[frames] = summarize(costs, cfg, args.steps, "full", frames, args.motion_steps)
        if frames == cfg.num_frames:
            flops_paper = summarize(costs, cfg, args.steps, "paper", frames, args.motion_steps)
    return flops_by_frames, flops_paper


def _pipeline(model, encoder, backend: str, args) -> CMDPipeline:
    return CMDPipeline(model, encoder, backend,
                       {"mode": args.compile_mode} if backend == "compile" and args.compile_mode else None)


def run_backends(model, encoder, backends, cfg, device, args, flops_by_frames, report) -> tuple:
    """Each backend at each batch size, timed: (runs, outputs at the smallest batch per backend). The first
    backend also times the image VAE decode apart (unless ``--skip-vae``)."""
    runs, outputs = [], {}
    for backend in backends:
        pipe = _pipeline(model, encoder, backend, args)
        for batch in args.batch_sizes:
            print(f"[cmd] backend {backend}, batch {batch}", flush=True)
            keep = {} if batch == min(args.batch_sizes) else None
            run = cmd_run(pipe, batch, args, keep)
            result = timed(run, device, args.repeats, args.warmup)
            del run  # its closure holds the pipeline (and a backend's graphs): free them with it
            if keep:
                outputs[backend] = keep.pop("video").detach().to("cpu", copy=True)
            result.update(backend=backend, batch=batch, frames=cfg.num_frames)
            _achieved(result, flops_by_frames[cfg.num_frames], batch)
            runs.append(result)
            # One line per measurement as it ends: a run cut short (a time limit) still shows what finished.
            print("[result] " + json.dumps({k: result[k] for k in ("backend", "batch", "frames", "latency_s",
                                                                    "stages_s", "peak_reserved_gb")}), flush=True)
        if backend == backends[0] and not args.skip_vae:
            report["vae_decode"] = vae_apart(pipe, device, args)
        del pipe
        _free(device)
    return runs, outputs


def best_and_speedups(runs: List[dict], baseline: Optional[dict], cfg, args) -> tuple:
    """The fastest backend at the smallest batch and its speedups over eager and the baseline (same run)."""
    b1 = {r["backend"]: r for r in runs if r["batch"] == min(args.batch_sizes)}
    best = min(b1, key=lambda b: b1[b]["latency_s"])
    speedup = {}
    if "eager" in b1:
        speedup["vs_eager"] = _sig(b1["eager"]["latency_s"] / b1[best]["latency_s"])
    base16 = [r for r in (baseline or {}).get("runs", []) if r["frames"] == cfg.num_frames]
    if base16 and min(args.batch_sizes) == 1:
        speedup["vs_baseline"] = _sig(base16[0]["latency_s"] / b1[best]["latency_s"])
    return best, speedup


def frame_scaling(model, encoder, best: str, cfg, device, args, flops_by_frames) -> List[dict]:
    """Frame scaling with the fastest backend: the same networks, configs that allow longer clips."""
    scaling = []
    for frames in args.frames:
        print(f"[scaling] {frames} frames ({best})", flush=True)
        model_f = CMDModel(_with_frames(cfg, frames), model.autoencoder, model.motion_dit, model.content_unet,
                           model.vae)
        pipe = _pipeline(model_f, encoder, best, args)
        result = timed(cmd_run(pipe, 1, args), device, args.repeats, args.warmup)
        result.update(frames=frames, tflops=round(flops_by_frames[frames]["cmd"]["total"], 3))
        scaling.append(result)
        print("[result] " + json.dumps({"scaling": best, "frames": frames, "latency_s": result["latency_s"],
                                        "stages_s": result["stages_s"],
                                        "peak_reserved_gb": result["peak_reserved_gb"]}), flush=True)
        del pipe, model_f
        _free(device)
    return scaling


def run_benchmark(args) -> dict:
    """The whole measurement as named steps: check the arguments, count FLOPs, time the baseline (first,
    alone on the device), build the model, time every backend, compare outputs, find the best backend,
    scale frames with it, check the targets."""
    device, dtype, cfg, backends = check_run_args(args)
    report = {"environment": environment(device),
              "settings": {"dtype": args.dtype, "steps": args.steps, "motion_steps": args.motion_steps,
                           "guidance": args.guidance, "repeats": args.repeats, "warmup": args.warmup,
                           "batch_sizes": args.batch_sizes, "seed": args.seed, "prompt": PROMPT},
              "config": {"name": cfg.name, "num_frames": cfg.num_frames, "height": cfg.height, "width": cfg.width}}
    report["ceiling"] = matmul_ceiling(device, dtype)
    flops_by_frames, flops_paper = count_flops(cfg, args)
    report["flops"] = {"full": flops_by_frames[cfg.num_frames], "paper": flops_paper}
    if not args.skip_baseline:  # first, alone on the device, so its peak holds no CMD weights
        report["baseline"] = bench_baseline(cfg, device, dtype, args.guidance, flops_by_frames, args)

    torch.manual_seed(args.seed)
    model = CMDModel.from_config(cfg, device=device).to(dtype=dtype)
    text = cfg.text_encoder
    encoder = RandomTextEncoder(text.hidden_size, text.max_length).to(device)
    report["params"] = {"content_unet": _params(model.content_unet), "motion_dit": _params(model.motion_dit),
                        "ae_decoder": flops_paper["networks"]["ae_decoder"]["params"],
                        "autoencoder": _params(model.autoencoder), "image_vae": _params(model.vae),
                        "text_encoder (random)": _params(encoder),
                        "baseline_unet3d": (report.get("baseline") or {}).get("params")}

    runs, outputs = run_backends(model, encoder, backends, cfg, device, args, flops_by_frames, report)
    report["runs"] = runs
    # Same seed and inputs: each backend's output against eager's (batch min(--batch-sizes)).
    report["vs_eager_output"] = ({b: compare_outputs(v, outputs["eager"]) for b, v in outputs.items() if b != "eager"}
                                 if "eager" in outputs else {})
    del outputs
    best, report["speedup"] = best_and_speedups(runs, report.get("baseline"), cfg, args)
    report["best_backend"] = report["scaling_backend"] = best
    report["scaling"] = frame_scaling(model, encoder, best, cfg, device, args, flops_by_frames)
    report["targets"] = check_targets(report)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    # diffusers warns on every .to(dtype) of a model built from a config (not from_pretrained): noise here.
    diffusers_logging.set_verbosity_error()
    report = run_benchmark(args)
    env = report["environment"]
    slug = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()[:40]
    stem = args.name or f"paper_scale-{slug}-{env['utc'].replace(':', '').replace('-', '')}"
    out = Path(args.out)
    report["files"] = {"json": str(out / f"{stem}.json"), "table": str(out / f"{stem}.md"), "plot": None}
    png = plot(report, out / f"{stem}.png")
    report["files"]["plot"] = png
    table = format_tables(report)
    write_text(str(out / f"{stem}.md"), table)
    write_json(str(out / f"{stem}.json"), report, indent=1)
    print(table)
    print(json.dumps({"json": report["files"]["json"], "best_backend": report["best_backend"],
                      "speedup": report["speedup"], "targets": report["targets"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
