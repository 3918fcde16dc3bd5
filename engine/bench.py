"""python -m engine.bench latency|memory|flops: how fast, how big, how much work.

    python -m engine.bench latency [--model random:default] [--backends eager,compile,cudagraph] [--json]
    python -m engine.bench memory  [same options]
    python -m engine.bench flops   [--config NAME] [--steps N] [--accounting paper|full] [--json]

``latency`` runs the backends side by side in one process on one model: each gets ``--warmup``
untimed calls (compilation and CUDA-graph capture happen there), then ``--iters`` timed calls;
per-stage times come from the pipeline (CUDA events on a GPU, the wall clock on a CPU) and are
reported as medians, with each backend's speed-up and PSNR against eager (same seed, same inputs).
With random weights the PSNR says little beyond a few steps: an untrained model's sampling is chaotic
and amplifies float noise (compile vs eager on ``random:default``: 1e-4 apart after one step, apart
entirely after 25); judge it on trained weights or with ``--steps 2``.
``memory`` reports each backend's peak CUDA memory of one call after warm-up, or the process's peak
RSS on a CPU (which only grows: read it per backend in its own run for absolute numbers). ``flops``
is :mod:`engine.flops` (meta-device FLOP counts for any config).

``--model``: ``random:<config>`` (the default, ``random:default``; random weights and a random text
encoder, enough for timing any config, e.g. ``random:ucf101-64`` on a GPU), ``default`` or a model
folder. ``--json`` prints the whole result as JSON on the last stdout line.
"""

import argparse
import json
import math
import platform
import statistics
import sys
from typing import Dict, List, Optional

import numpy as np

STAGES = ("text", "content", "motion", "decode", "vae")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``engine.bench`` and ``engine.profile``: model, device, shapes, steps."""
    p.add_argument("--model", default="random:default", help="random:<config> (default random:default), "
                   "'default' or a model folder")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, "
                   "float32 on CPU)")
    p.add_argument("--prompt", default="a red circle moving right")
    p.add_argument("--batch", type=int, default=1, help="prompts per call")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="content steps (default: the config's)")
    p.add_argument("--motion-steps", type=int, default=None, help="motion steps (default: the config's)")
    p.add_argument("--scheduler", default=None, help="ddim or dpm")
    p.add_argument("--seed", type=int, default=0)


def resolve_run(args):
    """Validate the shared options; returns (spec, device, dtype, request kwargs)."""
    import torch

    from engine.default_model import resolve_model
    from engine.pipeline import check_request, parse_device, parse_dtype

    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    spec = resolve_model(args.model)
    kwargs = dict(num_frames=args.frames, height=args.height, width=args.width,
                  num_inference_steps=args.steps, motion_steps=args.motion_steps, scheduler=args.scheduler)
    check_request(spec.load_config(), **kwargs)
    return spec, device, dtype, kwargs


def call_kwargs(args, kwargs) -> dict:
    """Keyword arguments of one pipeline call: fixed prompts and seeds, no progress bars."""
    prompts = [args.prompt] * args.batch
    return dict(kwargs, prompt=prompts, generator=args.seed, progress=False)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two frame arrays in [0, 1] (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _backends(text: Optional[str], device) -> List[str]:
    from engine.backends import get_backend

    names = text.split(",") if text else (["eager", "compile"] + (["cudagraph"] if device.type == "cuda" else []))
    names = [n.strip() for n in names if n.strip()]
    for name in names:
        get_backend(name)  # a ValueError for unknown or unavailable ones
        if name == "cudagraph" and device.type != "cuda":
            raise ValueError("backend 'cudagraph' needs a CUDA device (--device cuda)")
    if "eager" in names:  # eager first: the others are compared with it
        names.remove("eager")
    return ["eager"] + names


def _environment(device, dtype) -> dict:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "dtype": str(dtype).replace("torch.", "")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_latency(pipe, names: List[str], call: dict, warmup: int, iters: int) -> Dict[str, dict]:
    """Per backend: median per-stage seconds, total, speed-up and PSNR vs eager."""
    results, reference = {}, None
    for name in names:
        pipe.set_backend(name)
        for _ in range(warmup):
            pipe(**call)
        runs = [pipe(**call) for _ in range(iters)]
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
    """Per backend: peak CUDA memory of one call after warm-up, or the process's peak RSS on a CPU."""
    import resource

    import torch

    results = {}
    for name in names:
        pipe.set_backend(name)
        for _ in range(warmup):
            pipe(**call)
        if pipe.device.type == "cuda":
            _sync(pipe.device)
            torch.cuda.reset_peak_memory_stats(pipe.device)
            before = torch.cuda.memory_allocated(pipe.device)
            pipe(**call)
            _sync(pipe.device)
            results[name] = {"weights_and_cache_mb": before / 2**20,
                             "peak_allocated_mb": torch.cuda.max_memory_allocated(pipe.device) / 2**20,
                             "peak_reserved_mb": torch.cuda.max_memory_reserved(pipe.device) / 2**20}
        else:
            pipe(**call)
            # ru_maxrss is in KiB on Linux; it is the process's peak so far (it never goes down).
            results[name] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return results


def _jsonable(obj):
    """JSON has no inf/nan: write them as null (PSNR of identical outputs is inf)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _table(kind: str, results: Dict[str, dict]) -> str:
    if kind == "latency":
        stages = [s for s in STAGES if any(s in r["stages_s"] for r in results.values())]
        head = f"{'backend':<12}" + "".join(f"{s + ' ms':>12}" for s in stages) + \
            f"{'total ms':>12}{'vs eager':>10}{'PSNR dB':>10}"
        rows = [head]
        for name, r in results.items():
            cells = "".join(f"{r['stages_s'].get(s, 0) * 1e3:>12.2f}" for s in stages)
            rows.append(f"{name:<12}{cells}{r['total_s'] * 1e3:>12.2f}{r['speedup_vs_eager']:>9.2f}x"
                        f"{r['psnr_vs_eager_db']:>10.1f}")
        return "\n".join(rows)
    keys = list(next(iter(results.values())))
    rows = [f"{'backend':<12}" + "".join(f"{k:>22}" for k in keys)]
    rows += [f"{name:<12}" + "".join(f"{r[k]:>22.1f}" for k in keys) for name, r in results.items()]
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["flops"]:
        try:
            from engine import flops
        except ImportError as e:
            print(f"error: the FLOP counter (engine.flops) is not available in this version: {e}", file=sys.stderr)
            return 2
        return flops.main(argv[1:])
    parser = _Parser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("latency", "memory", "flops"))
    add_run_args(parser)
    parser.add_argument("--backends", default=None, help="comma-separated (default: eager,compile[,cudagraph])")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per backend (compile, capture)")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per backend")
    parser.add_argument("--json", action="store_true", help="print the result as JSON, the last line of stdout")
    try:
        args = parser.parse_args(argv)
        if args.warmup < 0 or args.iters < 1:
            raise ValueError(f"need --warmup >= 0 and --iters >= 1, got {args.warmup} and {args.iters}")
        spec, device, dtype, kwargs = resolve_run(args)
        names = _backends(args.backends, device)
        from engine.pipeline import CMDPipeline

        pipe = CMDPipeline.from_pretrained(spec, device=device, dtype=dtype)  # quiet by itself (engine.logs)
        req = pipe.check_inputs(args.batch, **kwargs)
        call = call_kwargs(args, kwargs)
        if args.kind == "latency":
            results = bench_latency(pipe, names, call, args.warmup, args.iters)
        else:
            results = bench_memory(pipe, names, call, args.warmup)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    report = {"kind": args.kind, "model": args.model, "environment": _environment(device, dtype),
              "shape": {"batch": args.batch, "frames": req.num_frames, "height": req.height, "width": req.width,
                        "steps": req.steps, "motion_steps": req.motion_steps, "scheduler": req.scheduler,
                        "guidance": req.guidance, "motion_guidance": req.motion_guidance},
              "warmup": args.warmup, "iters": args.iters if args.kind == "latency" else 1, "backends": results}
    print(f"{args.kind}: {args.model} on {report['environment'].get('gpu', str(device))} ({report['environment']['dtype']}), "
          f"batch {args.batch}, {req.num_frames}x{req.height}x{req.width}, steps {req.steps}/{req.motion_steps} "
          f"{req.scheduler}")
    print(_table(args.kind, results))
    if args.json:
        print(json.dumps(_jsonable(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
