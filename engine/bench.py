"""python -m engine.bench latency|memory|flops|cache|cpu: how fast, how big, how much work.

    python -m engine.bench latency [--model random:default] [--backends eager,compile,cudagraph] [--json]
    python -m engine.bench memory  [same options]
    python -m engine.bench flops   [--config NAME] [--steps N] [--accounting paper|full] [--json]
    python -m engine.bench cache   --model default [--settings none,static,dynamic:0.1,...] [--json]
    python -m engine.bench cpu     [--model default] [--busy 3] [--iters 3] [--rounds 2] [--json]

``latency`` runs the backends side by side in one process on one model: each gets ``--warmup``
untimed calls (compilation and CUDA-graph capture happen there), then ``--iters`` timed calls;
per-stage times come from the pipeline (CUDA events on a GPU, the wall clock on a CPU) and are
reported as medians, with each backend's speed-up and PSNR against eager (same seed, same inputs).
With random weights the PSNR says little beyond a few steps: an untrained model's sampling is chaotic
and amplifies float noise (compile vs eager on ``random:default``: 1e-4 apart after one step, apart
entirely after 25); judge it on trained weights or with ``--steps 2``.
``memory`` reports each backend's peak CUDA memory of one call after warm-up as peak *reserved* memory
(:mod:`engine.memory`: it counts CUDA graphs' private pools, which allocated memory leaves out), with
allocated and graph-pool figures beside it, or the process's peak RSS on a CPU (which only grows: read it per backend in its own run for absolute numbers). ``flops``
is :mod:`engine.flops` (meta-device FLOP counts for any config). ``cache`` compares step-caching
settings (:mod:`engine.cache`) side by side on the same prompts and seeds (see :func:`bench_cache`):
denoiser evaluations, wall time per video, PSNR/SSIM against the uncached videos, and the FLOPs the
same evaluation counts would cost at paper scale (``--flops-config``). ``cpu`` runs the default model with
its default settings under the engine's CPU thread policy (:mod:`engine.cpu`), with one thread, and with
PyTorch's own defaults, each in its own process, on the machine as it is and with busy loops beside it
(:func:`bench_cpu`; docs/performance-cpu.md).

``--model``: ``random:<config>`` (the default, ``random:default``; random weights and a random text
encoder, enough for timing any config, e.g. ``random:ucf101-64`` on a GPU), ``default`` or a model
folder. ``--json`` prints the whole result as JSON on the last stdout line.
"""

import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional

import numpy as np

from engine.cli import Int, Parser, Seed, add_lora_argument, check_seed, print_error, read_prompts, run_main
from cmd_kernels.measure import environment, sync, wall_times

TIMED_STAGES = ("text", "content", "motion", "decode", "vae")
DEFAULT_CACHE_SETTINGS = ("none,static,static:0.3,dynamic:0.05,dynamic:0.1,dynamic:0.2,none@0.2-0.8,"
                          "static@0.2-0.8")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``engine.bench`` and ``engine.profile``: model, device, shapes, steps."""
    p.add_argument("--model", default="random:default", help="random:<config> (default random:default), "
                   "'default' or a model folder")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, "
                   "float32 on CPU)")
    p.add_argument("--prompt", default="a red circle moving right")
    p.add_argument("--batch", type=Int(), default=1, help="prompts per call")
    p.add_argument("--frames", type=Int(), default=None)
    p.add_argument("--height", type=Int(), default=None)
    p.add_argument("--width", type=Int(), default=None)
    p.add_argument("--steps", type=Int(), default=None, help="content steps (default: the config's)")
    p.add_argument("--motion-steps", type=Int(), default=None, help="motion steps (default: the config's)")
    p.add_argument("--scheduler", default=None, help="ddim or dpm")
    p.add_argument("--seed", type=Seed, default=0, help="prompt k of a call is seeded --seed + k")
    add_lora_argument(p)


def request_kwargs(args) -> dict:
    """The request's keyword arguments (:func:`engine.request.check_request`) from the shared options."""
    return dict(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                motion_steps=args.motion_steps, scheduler=args.scheduler)


def resolve_run(args):
    """Validate the shared options before loading any weights; returns (spec, device, dtype, the
    validated :class:`~engine.request.Request`)."""
    import torch

    from engine.default_model import resolve_model
    from engine.request import check_request, parse_device, parse_dtype

    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    check_seed("--seed", args.seed, getattr(args, "num_prompts", None) or args.batch)
    spec = resolve_model(args.model)
    from engine.adapters import check_lora_args

    args.loras = check_lora_args(getattr(args, "lora", []))  # the adapter files, before any weights load
    return spec, device, dtype, check_request(spec.load_config(), **request_kwargs(args))


def call_kwargs(args, request) -> dict:
    """Keyword arguments of one ``pipe.run`` call of ``request``: fixed prompts and seeds, no progress bars."""
    prompts = [args.prompt] * args.batch
    return dict(request=request, prompt=prompts, generator=args.seed, progress=False)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over the whole of two frame arrays in [0, 1] (:func:`engine.quality.psnr`), inf when equal."""
    import torch

    from engine.quality import psnr as video_psnr

    x, y = (torch.as_tensor(np.asarray(v, np.float64)).reshape(1, -1) for v in (a, b))
    return math.inf if torch.equal(x, y) else float(video_psnr(x, y, data_range=1.0))


def _backends(text: Optional[str], device, dtype=None) -> List[str]:
    """The backend names of ``text`` (default: eager, compile and, on CUDA, cudagraph), eager first; a
    ValueError for an unknown or unavailable one and, with ``dtype``, for one not ready (exported graphs or
    plans, TensorRT: :func:`engine.backends.check_backend_ready`), before any weights load."""
    from engine.backends import check_backend_ready, get_backend

    names = text.split(",") if text else (["eager", "compile"] + (["cudagraph"] if device.type == "cuda" else []))
    names = [n.strip() for n in names if n.strip()]
    for name in names:
        get_backend(name)  # a ValueError for unknown or unavailable ones
        if name == "cudagraph" and device.type != "cuda":
            raise ValueError("backend 'cudagraph' needs a CUDA device (--device cuda)")
        if dtype is not None:
            check_backend_ready(name, device, dtype)  # exported graphs or plans, TensorRT: before any weights load
    if "eager" in names:  # eager first: the others are compared with it
        names.remove("eager")
    return ["eager"] + names


def bench_latency(pipe, names: List[str], call: dict, warmup: int, iters: int) -> Dict[str, dict]:
    """Per backend: median per-stage seconds, total, speed-up and PSNR vs eager. ``call``: keyword
    arguments of ``pipe.run`` (:func:`call_kwargs`)."""
    results, reference = {}, None
    for name in names:
        pipe.set_backend(name)
        _, runs = wall_times(lambda: pipe.run(**call), pipe.device, iters, warmup)
        stages = {k: statistics.median(r.timings[k] for r in runs) for k in runs[0].timings}
        frames = runs[-1].frames
        if reference is None:
            reference = frames
        results[name] = {"stages_s": stages, "total_s": stages["total"],
                         "psnr_vs_eager_db": psnr(frames, reference)}
    base = results[names[0]]["total_s"]
    for r in results.values():
        r["speedup_vs_eager"] = base / r["total_s"] if r["total_s"] > 0 else None
    return results


def bench_memory(pipe, names: List[str], call: dict, warmup: int) -> Dict[str, dict]:
    """Per backend: peak CUDA memory of one call after warm-up, or the process's peak RSS on a CPU. ``call``:
    keyword arguments of ``pipe.run`` (:func:`call_kwargs`)."""
    import resource

    import torch

    from engine.memory import BASIS as MEMORY_BASIS, GB, peak_memory, reset_peak

    results = {}
    for name in names:
        pipe.set_backend(name)
        for _ in range(warmup):
            pipe.run(**call)
        if pipe.device.type == "cuda":
            reset_peak(pipe.device)
            before = torch.cuda.memory_reserved(pipe.device)
            pipe.run(**call)
            peak = peak_memory(pipe.device)  # reserved: CUDA graphs' pools counted as eager's activations are
            results[name] = {"basis": MEMORY_BASIS, "reserved_before_mb": before / 2**20,
                             "peak_reserved_mb": peak["peak_reserved_gb"] * GB / 2**20,
                             "peak_allocated_mb": peak["peak_allocated_gb"] * GB / 2**20,
                             "graph_pools_mb": peak["graph_pools_gb"] * GB / 2**20}
        else:
            pipe.run(**call)
            # ru_maxrss is in KiB on Linux; it is the process's peak so far (it never goes down).
            results[name] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return results


def parse_cache_setting(text: str) -> dict:
    """``MODE[:THRESHOLD][@START-END]`` -> pipeline keyword arguments. MODE: none, static or dynamic;
    e.g. ``static``, ``dynamic:0.1``, ``none@0.2-0.8`` (a guidance interval alone), ``static:0.3@0-0.5``.
    Values are checked as the pipeline checks them (a one-line ValueError)."""
    from engine.cache import CACHE_MODES, check_guidance_interval, check_threshold

    spec, _, interval = text.strip().partition("@")
    mode, _, threshold = spec.partition(":")
    if mode not in ("none",) + CACHE_MODES:
        raise ValueError(f"cache setting {text!r}: mode must be none, static or dynamic")
    kwargs = {} if mode == "none" else {"cache": mode}
    try:
        if threshold:
            if mode == "none":
                raise ValueError("a threshold needs static or dynamic")
            kwargs["cache_threshold"] = check_threshold(float(threshold))
        if interval:
            start, sep, end = interval.partition("-")
            if not sep:
                raise ValueError("an interval is START-END, e.g. 0.2-0.8")
            kwargs["guidance_interval"] = check_guidance_interval((float(start), float(end)))
    except ValueError as e:
        raise ValueError(f"cache setting {text!r}: {e}") from None
    return kwargs


def bench_cache(pipe, prompts: List[str], settings: Dict[str, dict], seed: int = 0, batch_size: int = 8,
                score=None, seeds: Optional[List[int]] = None, **call) -> Dict[str, dict]:
    """Step-caching settings side by side: ``settings`` maps a name to pipeline keyword arguments
    (``cache``, ``cache_threshold``, ``guidance_interval``); the first is the reference (normally no cache).

    Prompt k is seeded ``seeds[k]`` (default ``seed + k``) in every setting; each batch of ``batch_size``
    prompts runs every setting in turn (so load drifts on a shared machine hit all settings alike). Per
    setting: denoiser sample evaluations per video (``content``, ``motion``, their first-block-only rows
    and ``full_total``), the ratio of full evaluations to the reference's, wall seconds per video (the
    pipeline call, all stages: the mean, and the median over batches, which a stall of the machine during
    one batch does not move) and the speed-up of the median, mean per-video PSNR (dB, inf if identical)
    and SSIM of the frames against the reference's, and ``score(videos)``'s result where given
    (``videos``: (N, L, 3, H, W) in [-1, 1], e.g. attribute accuracy from the trainer, which the engine
    cannot import).
    ``call``: more pipeline keyword arguments (steps, guidance, negative_prompt, ...)."""
    import torch

    from engine.quality import psnr as video_psnr, ssim as video_ssim
    from engine.request import REQUEST_ARGS

    if not settings:
        raise ValueError("no cache settings to compare")
    request = {k: v for k, v in call.items() if k in REQUEST_ARGS}
    call = {k: v for k, v in call.items() if k not in REQUEST_ARGS}
    # Every setting validated into its request before any work.
    requests = {name: pipe.check_inputs(min(batch_size, len(prompts)), **request, **kwargs)
                for name, kwargs in settings.items()}
    seeds = list(seeds) if seeds is not None else [seed + k for k in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    names = list(settings)
    videos = {n: [] for n in names}
    seconds = {n: [] for n in names}  # per batch: seconds per video
    stages = {n: {} for n in names}
    counts = {n: {} for n in names}
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        gens = lambda: [torch.Generator().manual_seed(s) for s in seeds[start:start + len(chunk)]]  # noqa: E731
        for name in names:
            (wall,), (out,) = wall_times(lambda: pipe.run(requests[name], chunk, generator=gens(), output_type="pt",
                                                          progress=False, **call), pipe.device, repeats=1)
            seconds[name].append(wall / len(chunk))
            videos[name].append(out.frames.float().cpu())
            for key, value in out.evaluations.items():
                counts[name][key] = counts[name].get(key, 0) + value
            for key, value in out.timings.items():
                stages[name][key] = stages[name].get(key, 0.0) + value
    n = len(prompts)
    reference = torch.cat(videos[names[0]])
    results = {}
    for name in names:
        frames = torch.cat(videos[name])
        per_video = {k: v / n for k, v in counts[name].items()}
        per_video["full_total"] = per_video.get("content", 0) + per_video.get("motion", 0)
        p = video_psnr(frames, reference, data_range=1.0)
        p[(frames == reference).flatten(1).all(1)] = math.inf  # identical videos (psnr() caps at 200 dB)
        results[name] = {"kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in settings[name].items()},
                         "evaluations_per_video": per_video,
                         "seconds_per_video": sum(s * len(b) for s, b in zip(seconds[name], videos[name])) / n,
                         "seconds_per_video_median": statistics.median(seconds[name]),
                         "stages_s_per_video": {k: v / n for k, v in stages[name].items()},
                         "psnr_db": float(p.mean()), "psnr_db_min": float(p.min()),
                         "ssim": float(video_ssim(frames, reference, data_range=1.0).mean())}
        if score is not None:
            results[name]["score"] = score(frames * 2 - 1)
    base = results[names[0]]
    for r in results.values():
        full = r["evaluations_per_video"]["full_total"]
        r["fewer_evaluations"] = base["evaluations_per_video"]["full_total"] / full if full else None
        r["speedup"] = base["seconds_per_video_median"] / r["seconds_per_video_median"]
    return results


def cache_flops(config, results: Dict[str, dict]) -> dict:
    """TFLOPs per video (full accounting: 2 per multiply-add, attention included) at ``config``'s scale
    for each setting's measured evaluations per video: full rows x one network evaluation, first-block
    rows x the first block (the DiT's output head too), plus one AE decode. The schedules were measured
    on another model: this is what the same evaluation counts cost at that scale."""
    import torch

    from engine import flops
    from engine.cache import DiTParts, UNetParts
    from engine.configs import load_config
    from engine.models import CMDModel

    cfg = config if not isinstance(config, str) else load_config(config)
    costs = flops.measure(cfg)
    model = CMDModel.from_config(cfg, device="meta")
    meta = {"device": "meta"}
    t = torch.zeros(1, **meta)
    content = torch.empty(1, cfg.channels, cfg.latent_height, cfg.latent_width, **meta)
    motion = torch.empty(1, *cfg.motion_shape(), **meta)
    states = torch.empty(1, cfg.text_encoder.max_length, cfg.text_encoder.hidden_size, **meta)
    pooled = torch.empty(1, cfg.text_encoder.hidden_size, **meta)
    unet, dit = UNetParts(model.content_unet), DiTParts(model.motion_dit)

    def dit_first_block():
        x1, _, c = dit.head(motion, t, content, pooled)
        return dit.final(x1, c, tuple(motion.shape))

    heads = {"content": flops.count_evaluation(model.content_unet, lambda: unet.head(content, t, states)),
             "motion": flops.count_evaluation(model.motion_dit, dit_first_block)}
    tera = lambda c: (c.flops + c.attention_flops) / 1e12  # noqa: E731
    per_eval = {"content": tera(costs["content_unet"]), "motion": tera(costs["motion_dit"])}
    decoder = tera(costs["ae_decoder"])
    out = {"config": cfg.name, "accounting": "full", "tflops_per_evaluation": dict(per_eval),
           "tflops_per_first_block": {k: tera(v) for k, v in heads.items()}, "ae_decoder_tflops": decoder,
           "settings": {}}
    for name, r in results.items():
        ev = r["evaluations_per_video"]
        total = decoder + sum(ev.get(s, 0) * per_eval[s] + ev.get(f"{s}_first_block", 0) * tera(heads[s])
                              for s in ("content", "motion"))
        out["settings"][name] = {"tflops_per_video": total}
    base = next(iter(out["settings"].values()))["tflops_per_video"]
    for entry in out["settings"].values():
        entry["flops_saved"] = 1 - entry["tflops_per_video"] / base
    return out


def jsonable(obj):
    """JSON has no inf/nan: write them as null (PSNR of identical outputs is inf)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _table(kind: str, results: Dict[str, dict]) -> str:
    if kind == "latency":
        stages = [s for s in TIMED_STAGES if any(s in r["stages_s"] for r in results.values())]
        head = f"{'backend':<12}" + "".join(f"{s + ' ms':>12}" for s in stages) + \
            f"{'total ms':>12}{'vs eager':>10}{'PSNR dB':>10}"
        rows = [head]
        for name, r in results.items():
            cells = "".join(f"{r['stages_s'].get(s, 0) * 1e3:>12.2f}" for s in stages)
            rows.append(f"{name:<12}{cells}{r['total_s'] * 1e3:>12.2f}{r['speedup_vs_eager']:>9.2f}x"
                        f"{r['psnr_vs_eager_db']:>10.1f}")
        return "\n".join(rows)
    first = next(iter(results.values()))
    keys = [k for k, v in first.items() if isinstance(v, (int, float))]
    rows = [f"{'backend':<12}" + "".join(f"{k:>22}" for k in keys)]
    rows += [f"{name:<12}" + "".join(f"{r[k]:>22.1f}" for k in keys) for name, r in results.items()]
    if "basis" in first:
        rows.append(f"memory: {first['basis']}")
    return "\n".join(rows)


def _cache_table(results: Dict[str, dict], flops: Optional[dict]) -> str:
    head = (f"{'setting':<22}{'UNet evals':>11}{'DiT evals':>10}{'1st-block':>10}{'fewer':>8}{'s/video':>9}"
            f"{'speed-up':>9}{'PSNR dB':>9}{'SSIM':>7}" + (f"{'TFLOPs':>10}" if flops else ""))
    rows = [head]
    for name, r in results.items():
        ev = r["evaluations_per_video"]
        first = ev.get("content_first_block", 0) + ev.get("motion_first_block", 0)
        cells = (f"{name:<22}{ev.get('content', 0):>11.1f}{ev.get('motion', 0):>10.1f}{first:>10.1f}"
                 f"{r['fewer_evaluations']:>7.2f}x{r['seconds_per_video_median']:>9.3f}{r['speedup']:>8.2f}x"
                 f"{r['psnr_db']:>9.1f}{r['ssim']:>7.3f}")
        if flops:
            cells += f"{flops['settings'][name]['tflops_per_video']:>10.2f}"
        rows.append(cells)
    return "\n".join(rows)


def main_cache(argv: List[str]) -> int:
    """``python -m engine.bench cache``: :func:`bench_cache` from the command line."""
    parser = Parser(prog="python -m engine.bench cache", description=bench_cache.__doc__.split("\n\n")[0])
    add_run_args(parser)
    parser.add_argument("--settings", default=DEFAULT_CACHE_SETTINGS,
                        help="comma-separated MODE[:THRESHOLD][@START-END] (the first is the reference; default "
                        f"{DEFAULT_CACHE_SETTINGS})")
    parser.add_argument("--prompts-file", help="prompts, one a line (default: --prompt, --num-prompts times)")
    parser.add_argument("--num-prompts", type=Int(), default=8, help="with --prompt: how many videos (seeds) of it")
    parser.add_argument("--flops-config", default=None, help="also count the FLOPs of each setting's evaluations "
                        "at this config's scale (e.g. sd21-512x1024)")
    parser.add_argument("--backend", default="eager", help="the backend every setting runs on (default eager)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON, the last line of stdout")
    return run_main(lambda: _run_cache(parser.parse_args(argv)))


def _run_cache(args) -> int:
    spec, device, dtype, req = resolve_run(args)
    settings = {}
    for text in args.settings.split(","):
        if text.strip():
            settings[text.strip()] = parse_cache_setting(text)
    if not settings:
        raise ValueError("--settings lists no setting")
    if args.prompts_file:
        prompts = [p for _, p in read_prompts(args.prompts_file)]
        check_seed("--seed", args.seed, len(prompts))  # prompt k is seeded --seed + k
    else:
        prompts = [args.prompt] * args.num_prompts
    from engine.backends import get_backend
    from engine.pipeline import CMDPipeline
    from engine.request import check_request

    config = spec.load_config()
    if "," in args.backend:
        raise ValueError(f"--backend takes one backend, got {args.backend!r}")
    backend = _backends(args.backend, device)[-1]  # a ValueError for unknown or unavailable ones
    kwargs = request_kwargs(args)
    for setting in settings.values():  # a setting the model cannot run fails here, before any weights load
        check_request(config, backend=get_backend(backend), **kwargs, **setting)
    _backends(backend, device, dtype)  # then what the backend needs besides the weights (graphs, plans)
    pipe = CMDPipeline.from_pretrained(spec, device=device, dtype=dtype, backend=backend)
    from engine.adapters import load_lora_args

    load_lora_args(pipe, args.loras)
    results = bench_cache(pipe, prompts, settings, args.seed, args.batch, **kwargs)
    flops = cache_flops(args.flops_config, results) if args.flops_config else None
    report = {"kind": "cache", "model": args.model, "backend": backend, "environment": environment(device, dtype),
              "shape": {"videos": len(prompts), "batch": args.batch, "frames": req.num_frames, "height": req.height,
                        "width": req.width, "steps": req.steps, "motion_steps": req.motion_steps,
                        "scheduler": req.scheduler, "guidance": req.guidance, "motion_guidance": req.motion_guidance},
              "settings": results, "flops": flops}
    print(f"cache: {args.model} on {report['environment'].get('gpu', str(device))} ({report['environment']['dtype']}), "
          f"{len(prompts)} videos in batches of {args.batch}, {req.num_frames}x{req.height}x{req.width}, "
          f"steps {req.steps}/{req.motion_steps} {req.scheduler}")
    print(_cache_table(results, flops))
    if args.json:
        print(json.dumps(jsonable(report)))
    return 0


# -- cpu: the CPU thread policy on an idle and a busy machine ------------------------------------------

# Each setting is a child process's environment: OpenMP reads its variables once, when torch loads.
CPU_SETTINGS = {
    "default": {},                                  # the engine's policy (engine/cpu.py)
    "one thread": {"OMP_NUM_THREADS": "1"},
    "torch defaults": {"CMD_CPU_THREADS": "torch"},  # what the engine did before the policy
}
_CPU_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CMD_CPU_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def cpu_child(model: str, warmup: int, iters: int) -> None:
    """In a child process: the pipeline's wall time (s) of ``iters`` calls of ``model`` with default settings
    after ``warmup`` calls, and the threads torch ran them with, as one JSON line on stdout."""
    import time

    import torch

    from engine.pipeline import CMDPipeline

    pipe = CMDPipeline.from_pretrained(model)
    threads = []
    real_set = torch.set_num_threads

    def record(n):  # the count the policy chose for each call
        threads.append(n)
        real_set(n)

    torch.set_num_threads = record
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        pipe("a red circle moving right", generator=i, progress=False)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    torch.set_num_threads = real_set
    print(json.dumps({"times": times, "torch_threads": torch.get_num_threads(), "set": threads,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


def _busy_loops(n: int) -> List["subprocess.Popen"]:  # noqa: F821
    import subprocess

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def bench_cpu(model: str, busy: int, warmup: int, iters: int, rounds: int) -> List[Dict]:
    """Each of :data:`CPU_SETTINGS` in its own process, side by side, on the machine as it is (idle, if nothing
    else runs) and with ``busy`` busy loops beside it (one Python process each, a core's worth of work),
    ``rounds`` times in turn (the settings interleaved so that other load on the machine falls on all of them
    alike). Rows: condition, setting, median seconds per pipeline call (default settings of ``model``), all
    times, threads used."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in _CPU_ENV}
    code = "import sys; from engine.bench import cpu_child; cpu_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))"
    rows = []
    for condition, loops in (("no busy loops", 0), (f"{busy} busy loops", busy)):
        found = {name: [] for name in CPU_SETTINGS}
        info = {}
        procs = _busy_loops(loops)
        try:
            for _ in range(rounds):
                for name, extra in CPU_SETTINGS.items():
                    proc = subprocess.run([sys.executable, "-c", code, model, str(warmup), str(iters)],
                                          env=dict(env, **extra), capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise RuntimeError(f"cpu bench child ({name}) failed: {proc.stderr.strip()[-2000:]}")
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    found[name] += result["times"]
                    info[name] = result
                    print(f"  {condition}, {name}: {', '.join(f'{t:.3f}' for t in result['times'])} s", file=sys.stderr,
                          flush=True)  # progress: a busy machine's rows take minutes
        finally:
            for p in procs:
                p.kill()
                p.wait()
        for name in CPU_SETTINGS:
            chosen = info[name]["set"][0::2]  # per call: the policy's count, then the count put back
            threads = ",".join(str(n) for n in sorted(set(chosen))) if chosen else str(info[name]["torch_threads"])
            rows.append({"condition": condition, "setting": name, "median_s": statistics.median(found[name]),
                         "times_s": found[name], "threads": threads,
                         "omp_wait_policy": info[name]["omp_wait_policy"]})
    return rows


def _cpu_table(rows: List[Dict]) -> str:
    lines = ["| machine | setting | threads | OMP_WAIT_POLICY | median s / video | vs one thread |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        one = next(r["median_s"] for r in rows if r["condition"] == row["condition"] and r["setting"] == "one thread")
        lines.append(f"| {row['condition']} | {row['setting']} | {row['threads']} | {row['omp_wait_policy'] or '-'} | "
                     f"{row['median_s']:.3f} | {row['median_s'] / one:.2f}x |")
    return "\n".join(lines)


def main_cpu(argv: List[str]) -> int:
    """``python -m engine.bench cpu``: :func:`bench_cpu` from the command line."""
    parser = Parser(prog="python -m engine.bench cpu", description=bench_cpu.__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="the model to run with its default settings "
                        "(default: default, the shipped one)")
    parser.add_argument("--busy", type=int, default=3, help="busy loops beside it in the busy condition (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per process (default 1)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per process (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting and condition (default 2)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON, the last line of stdout")

    def body() -> int:
        args = parser.parse_args(argv)
        for flag, value, least in (("--busy", args.busy, 1), ("--warmup", args.warmup, 0), ("--iters", args.iters, 1),
                                   ("--rounds", args.rounds, 1)):
            if value < least:
                raise ValueError(f"{flag} must be >= {least}, got {value}")
        from engine.default_model import resolve_model

        resolve_model(args.model)  # a bad model: one line here, not in every child
        rows = bench_cpu(args.model, args.busy, args.warmup, args.iters, args.rounds)
        print(f"cpu: {args.model}, default settings, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
              f"{args.rounds} process(es) x {args.iters} call(s) per row")
        print(_cpu_table(rows))
        if args.json:
            print(json.dumps({"kind": "cpu", "model": args.model, "rows": rows}))
        return 0

    return run_main(body)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cache"]:
        return main_cache(argv[1:])
    if argv[:1] == ["cpu"]:
        return main_cpu(argv[1:])
    if argv[:1] == ["flops"]:
        try:
            from engine import flops
        except ImportError as e:
            print_error(f"the FLOP counter (engine.flops) is not available in this version: {e}")
            return 2
        return flops.main(argv[1:])
    parser = Parser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0],
                    epilog="cache, cpu and flops take options of their own: python -m engine.bench cache --help, "
                    "python -m engine.bench cpu --help, python -m engine.bench flops --help")
    parser.add_argument("kind", choices=("latency", "memory", "flops", "cache", "cpu"),
                        help="latency or memory: the backends side by side; flops: FLOP counts (engine.flops); "
                        "cache: step-caching settings side by side; cpu: the CPU thread policy on an idle and a "
                        "busy machine")
    add_run_args(parser)
    parser.add_argument("--backends", default=None, help="comma-separated (default: eager,compile[,cudagraph])")
    parser.add_argument("--warmup", type=Int(0), default=2, help="untimed calls per backend (compile, capture)")
    parser.add_argument("--iters", type=Int(), default=5, help="timed calls per backend")
    parser.add_argument("--json", action="store_true", help="print the result as JSON, the last line of stdout")
    return run_main(lambda: _run_backends(parser.parse_args(argv)))


def _run_backends(args) -> int:
    spec, device, dtype, req = resolve_run(args)
    names = _backends(args.backends, device, dtype)
    from engine.pipeline import CMDPipeline

    pipe = CMDPipeline.from_pretrained(spec, device=device, dtype=dtype)  # quiet by itself (engine.logs)
    from engine.adapters import load_lora_args

    load_lora_args(pipe, args.loras)
    pipe.check_backend(req, args.batch)
    call = call_kwargs(args, req)
    if args.kind == "latency":
        results = bench_latency(pipe, names, call, args.warmup, args.iters)
    else:
        results = bench_memory(pipe, names, call, args.warmup)
    report = {"kind": args.kind, "model": args.model, "environment": environment(device, dtype),
              "shape": {"batch": args.batch, "frames": req.num_frames, "height": req.height, "width": req.width,
                        "steps": req.steps, "motion_steps": req.motion_steps, "scheduler": req.scheduler,
                        "guidance": req.guidance, "motion_guidance": req.motion_guidance},
              "warmup": args.warmup, "iters": args.iters if args.kind == "latency" else 1, "backends": results}
    print(f"{args.kind}: {args.model} on {report['environment'].get('gpu', str(device))} ({report['environment']['dtype']}), "
          f"batch {args.batch}, {req.num_frames}x{req.height}x{req.width}, steps {req.steps}/{req.motion_steps} "
          f"{req.scheduler}")
    print(_table(args.kind, results))
    if args.json:
        print(json.dumps(jsonable(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
