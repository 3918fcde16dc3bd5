"""python -m engine.run: text -> video files, a thin layer over :class:`engine.pipeline.CMDPipeline`.

    python -m engine.run --prompt "a red circle moving right" --out red.mp4
    python -m engine.run --prompts-file prompts.txt --out-dir videos/      # videos/000.mp4, 001.mp4, ...

Everything is checked before any work and any file: a bad value gets one line ``error: ...`` on
stderr and exit code 2. Files are written atomically, so an error or Ctrl-C (exit 130) leaves no
partial file. With ``--prompts-file``, prompt i (0-based) uses seed ``--seed + i``: its video equals
``--prompt <line i> --seed <seed + i>``.

Under torchrun (``torchrun --nproc-per-node N -m engine.run --prompts-file F --out-dir D ...``) the batches
are dealt to the ranks (``engine.distributed``), each rank on its own device, the files are those one
process writes, and rank 0 writes ``D/index.jsonl`` when all are done. A prompt that fails (out of memory, a
write error) is recorded and the others go on; the exit code is then 1.
"""

import argparse
import math
import os
import signal
import sys
from typing import Dict, List, Optional

from engine.cli import Parser, add_lora_argument, one_line, read_prompts, run_ranks

DEVICES_HELP = "cpu, cuda or cuda:N"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m engine.run", description="Generate videos from text with a CMD model.")
    src = p.add_argument_group("prompts and outputs")
    src.add_argument("--prompt", help="the text of one video (or several with --num-videos)")
    src.add_argument("--prompts-file", help="a text file, one prompt a line (blank lines skipped); needs --out-dir")
    src.add_argument("--negative-prompt", default=None, help="what the content frame should not show")
    src.add_argument("--image", default=None, help="image-to-video: this image becomes the content frame")
    src.add_argument("--out", help="output file: .mp4, .gif or .npy (uint8 frames, H, W, 3)")
    src.add_argument("--out-dir", help="output folder for --prompts-file: DIR/000.mp4, DIR/001.mp4, ...")
    src.add_argument("--format", default="mp4", choices=("mp4", "gif", "npy"), help="file format with --out-dir")
    src.add_argument("--skip-existing", action="store_true",
                     help="skip prompts whose files are complete (resume an interrupted run)")
    gen = p.add_argument_group("generation (defaults come from the model's config)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--frames", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=float, default=None, help="content-model denoising steps")
    gen.add_argument("--motion-steps", type=float, default=None, help="motion-DiT denoising steps")
    gen.add_argument("--guidance", type=float, default=None, help="CFG scale of the content model")
    gen.add_argument("--motion-guidance", type=float, default=None, help="CFG scale (text) of the motion DiT")
    gen.add_argument("--scheduler", default=None, help="ddim or dpm (DPM-Solver++ 2M)")
    gen.add_argument("--num-videos", type=int, default=1, help="videos per prompt")
    gen.add_argument("--motion-variations", type=int, default=1, help="motions per content frame")
    gen.add_argument("--fps", type=float, default=None)
    gen.add_argument("--cache", choices=("static", "dynamic"), default=None,
                     help="fewer denoiser evaluations: the model's calibrated reuse schedule (static, any backend) "
                     "or first-block change decisions (dynamic, eager/compile)")
    gen.add_argument("--cache-threshold", type=float, default=None,
                     help="static: derive the schedule at this threshold; dynamic: skip below this relative change")
    gen.add_argument("--guidance-interval", type=float, nargs=2, metavar=("START", "END"), default=None,
                     help="CFG only on the steps in this fraction of each loop, e.g. 0.2 0.8")
    eng = p.add_argument_group("engine")
    eng.add_argument("--model", default=None, help="'default' (shipped weights), a model folder, or random:<config>")
    add_lora_argument(eng)
    eng.add_argument("--backend", default="eager", help="eager, compile, cudagraph, onnxruntime or tensorrt")
    eng.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    eng.add_argument("--device", default="cpu", help=DEVICES_HELP)
    eng.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call with --prompts-file")
    eng.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _count(flag: str, value: Optional[float]) -> Optional[int]:
    """Step counts parse as numbers so that 'nan', 'inf' and '2.5' get a clear message, not argparse's."""
    if value is None:
        return None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"{flag} must be a whole number >= 1, got {value:g}")
    return int(value)


def _outputs(args, n_prompts: int, per_prompt: int) -> List[List[str]]:
    """Output paths, ``[prompt][video]``; checks format and folders (creating nothing)."""
    from engine.video_io import check_output_dir, check_output_path, check_writer

    if args.out is not None:
        check_output_path(args.out)
        if per_prompt == 1:
            return [[args.out]]
        stem, ext = os.path.splitext(args.out)
        return [[f"{stem}-{k}{ext}" for k in range(per_prompt)]]
    check_output_dir(args.out_dir, create=True)
    ext = "." + args.format
    check_writer(ext)
    names = [[f"{i:03d}{ext}" if per_prompt == 1 else f"{i:03d}-{k}{ext}" for k in range(per_prompt)]
             for i in range(n_prompts)]
    return [[os.path.join(args.out_dir, n) for n in row] for row in names]


def _plan(args):
    """Validate every argument (no weights loaded, no file created). Returns what the run needs.
    Plain value checks come first, before the heavy imports, so that they fail at once."""
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts-file FILE")
    if args.prompt is not None and args.out is None:
        raise ValueError("--prompt needs --out PATH (.mp4, .gif or .npy)")
    if args.prompts_file is not None and args.out_dir is None:
        raise ValueError("--prompts-file needs --out-dir DIR")
    if args.out is not None and args.out_dir is not None:
        raise ValueError("give --out or --out-dir, not both")
    steps, motion_steps = _count("--steps", args.steps), _count("--motion-steps", args.motion_steps)
    for flag, value in (("--guidance", args.guidance), ("--motion-guidance", args.motion_guidance)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} must be a finite number >= 0, got {value:g}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise ValueError(f"--fps must be a positive number, got {args.fps:g}")
    for flag, value in (("--frames", args.frames), ("--height", args.height), ("--width", args.width),
                        ("--num-videos", args.num_videos), ("--motion-variations", args.motion_variations),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")

    from engine.backends import check_backend_ready, get_backend
    from engine.default_model import resolve_model
    from engine.request import check_request, parse_device, parse_dtype

    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    backend = get_backend(args.backend)  # unknown or not-installed backends fail here
    if backend.name == "cudagraph" and device.type != "cuda":
        raise ValueError(f"backend 'cudagraph' needs --device cuda, got --device {args.device}")

    numbered = [(None, args.prompt)] if args.prompt is not None else read_prompts(args.prompts_file)
    prompts = [p for _, p in numbered]
    spec = resolve_model(args.model)
    from engine.adapters import check_lora_args

    loras = check_lora_args(args.lora)  # the files, before any weights load
    config = spec.load_config()
    request = check_request(config, num_frames=args.frames, height=args.height, width=args.width,
                            num_inference_steps=steps, motion_steps=motion_steps, guidance_scale=args.guidance,
                            motion_guidance_scale=args.motion_guidance, scheduler=args.scheduler,
                            num_videos_per_prompt=args.num_videos, motion_variations=args.motion_variations,
                            cache=args.cache, cache_threshold=args.cache_threshold,
                            guidance_interval=args.guidance_interval, image_to_video=args.image is not None,
                            backend=backend)
    # What the backend needs besides the weights (exported graphs or plans, TensorRT), before they load; after
    # the request, whose own faults (a cache mode the backend cannot run) are the ones to report first.
    check_backend_ready(backend.name, device, dtype)
    image = None
    if args.image is not None:
        from engine.video_io import read_image

        image = read_image(args.image)
    outputs = _outputs(args, len(prompts), request.num_videos * request.motion_variations)
    fps = args.fps if args.fps is not None else float(config.sampling.fps)
    return dict(spec=spec, loras=loras, device=device, dtype=dtype, prompts=prompts, lines=[n for n, _ in numbered],
                request=request, image=image, outputs=outputs, fps=fps)


def _format_timings(timings: Dict[str, float]) -> str:
    order = ["text", "content", "motion", "decode", "vae", "write"]
    parts = [f"{k} {timings[k]:.3f}" for k in order if k in timings]
    total = sum(v for k, v in timings.items() if k != "total")
    return "timings (s): " + " | ".join(parts + [f"total {total:.3f}"])


def _check_prompt_lengths(encoder, plan, args) -> None:
    """A prompt (or negative prompt) the text encoder would cut short is bad input: the video would ignore
    its end."""
    texts = plan["prompts"] + ([args.negative_prompt] if args.negative_prompt is not None else [])
    for k, n in enumerate(encoder.num_tokens(texts)):
        if n > encoder.max_length:
            if k == len(plan["prompts"]):
                where = "--negative-prompt"
            else:
                where = "--prompt" if args.prompt is not None else f"line {plan['lines'][k]} of {args.prompts_file!r}"
            raise ValueError(f"{where} is too long for the text encoder: {n} tokens, at most {encoder.max_length}")


def _prepare(args):
    """This rank's plan and pipeline, every input checked."""
    plan = _plan(args)
    from engine.pipeline import CMDPipeline

    pipe = CMDPipeline.from_pretrained(plan["spec"], device=plan["device"], dtype=plan["dtype"],
                                       backend=args.backend)
    from engine.adapters import load_lora_args

    load_lora_args(pipe, plan["loras"])
    _check_prompt_lengths(pipe.text_encoder, plan, args)
    # The backend's limits (exported graphs' sizes and batches) for the largest batch, before any work.
    pipe.check_backend(plan["request"], min(args.batch_size, len(plan["prompts"])))
    return plan, pipe


def run(args, info=None) -> List[dict]:
    """Validate, load, generate (this rank's batches under torchrun), write. Returns every prompt's record,
    in order (``engine.distributed.run_sharded``). Under torchrun (``info``: an ``engine.distributed.DistInfo``
    of a joined group) a failure to start on any rank is raised on every rank (ValueError for bad input), so
    that all of them stop together."""
    from engine.distributed import DistInfo, Job, first_error, run_sharded

    info = info if info is not None else DistInfo()
    error = None
    try:
        plan, pipe = _prepare(args)
    except Exception as e:  # noqa: BLE001 -- under torchrun every rank must hear of it; see below
        if not info.enabled:
            raise
        error = (isinstance(e, (ValueError, FileNotFoundError)), one_line(e))
    if info.enabled:
        failed = first_error(error, info)
        if failed is not None:
            rank, (bad_input, message) = failed
            message = message if rank == 0 else f"rank {rank}: {message}"
            raise ValueError(message) if bad_input else RuntimeError(message)

    from engine.video_io import write_video

    jobs = [Job(i, prompt, args.seed + i, plan["outputs"][i], plan["lines"][i])
            for i, prompt in enumerate(plan["prompts"])]

    def generate(group):
        # An int generator seeds prompt k of the call with seed + k: prompt i gets --seed + i.
        result = pipe.run(plan["request"], [job.prompt for job in group], negative_prompt=args.negative_prompt,
                          generator=group[0].seed, image=plan["image"], progress=not args.quiet and info.is_main)
        return result.frames, result.timings

    def write(path, frames):
        if args.out_dir is not None:
            os.makedirs(args.out_dir, exist_ok=True)
        write_video(path, frames, fps=plan["fps"])
        print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
              f"{plan['fps']:g} fps)", flush=True)

    return run_sharded(jobs, args.batch_size, info, generate, write, skip_existing=args.skip_existing)


def _report(args, info, records: List[dict], torchrun: bool) -> int:
    """Rank 0: the index (under torchrun, with --out-dir), the timings and the summary. Every rank: the exit
    code, 1 when a prompt failed."""
    failed = [r for r in records if r["status"] == "failed"]
    index = os.path.join(args.out_dir, "index.jsonl") if torchrun and args.out_dir is not None else None
    if info.is_main:
        from engine.distributed import write_index

        if index is not None:
            os.makedirs(args.out_dir, exist_ok=True)
            write_index(index, records, root=args.out_dir)
        totals: Dict[str, float] = {}
        for r in records:
            for k, v in r.get("seconds", {}).items():
                totals[k] = totals.get(k, 0.0) + v
        print(_format_timings(totals), flush=True)
        if args.prompts_file is not None:
            counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed")}
            print(f"{len(records)} prompts: {counts['ok']} written, {counts['skipped']} skipped, "
                  f"{counts['failed']} failed" + (f"; index {index}" if index else ""), flush=True)
        if failed:
            which = ", ".join(f"{r['index']}" + (f" (line {r['line']})" if r["line"] is not None else "")
                              for r in failed[:10]) + (", ..." if len(failed) > 10 else "")
            print(f"error: {len(failed)} of {len(records)} prompts failed: {which}; first error: "
                  f"{failed[0]['error']}" + (f"; all in {index}" if index else ""), file=sys.stderr, flush=True)
    return 1 if failed else 0


def _join(args):
    """Under torchrun: join the process group (gloo on the CPU, NCCL on CUDA) and run on this rank's
    device (``--device cuda``: cuda:LOCAL_RANK). Without torchrun: one process, ``--device`` as given."""
    from datetime import timedelta

    from engine.distributed import DistInfo, init_distributed, torchrun_env

    if torchrun_env() is None:
        return DistInfo()
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"under torchrun --device is cpu or cuda (rank r runs on cuda:LOCAL_RANK), "
                         f"got {args.device!r}")
    # A rank that is done waits for the slowest in the final gather, however long that takes; a rank that
    # dies cannot leave the others waiting: torchrun ends them all.
    info = init_distributed(args.device, timeout=timedelta(hours=24))
    args.device = str(info.device)
    # torchrun ends the other workers with SIGTERM when one fails: unwind like Ctrl-C, so that no
    # temporary file is left behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return info


def main(argv=None) -> int:
    torchrun = "WORLD_SIZE" in os.environ

    def body(joined) -> int:
        args = build_parser().parse_args(argv)
        info = joined(_join(args))
        return _report(args, info, run(args, info), torchrun)

    # Every rank finds the same bad input; rank 0 alone says so. Under torchrun any other failure is
    # reported (traceback) and the rank still leaves the group (DESIGN 8).
    return run_ranks(body, interrupted="interrupted; no partial file was left",
                     speak=not torchrun or os.environ.get("RANK", "0") == "0", crash_code=1 if torchrun else None)


if __name__ == "__main__":
    sys.exit(main())
