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
import os
import signal
import sys
from typing import Dict, List

from engine.cli import (Int, Number, Parser, Seed, add_lora_argument, check_number, check_seed, one_line,
                        read_prompts, run_ranks)
from engine.video_io import FPS_MAX, FPS_MIN

DEVICES_HELP = "cpu, cuda or cuda:N"
DEFAULT_BATCH = 8  # prompts per pipeline call, where the backend takes that many


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m engine.run", description="Generate videos from text with a CMD model.")
    src = p.add_argument_group("prompts and outputs")
    src.add_argument("--prompt", help="the text of one video (or several with --num-videos)")
    src.add_argument("--prompts-file", help="a UTF-8 text file, one prompt a line; blank lines and lines starting "
                     "with # (comments) are skipped; needs --out-dir")
    src.add_argument("--negative-prompt", default=None, help="what the content frame should not show (not with "
                     "--image: the content model does not run)")
    src.add_argument("--image", default=None, help="image-to-video: this image (as an image viewer shows it) becomes "
                     "the content frame; the content model's flags (--steps, --guidance, --negative-prompt) do "
                     "not apply")
    src.add_argument("--out", help="output file: .mp4, .gif or .npy (uint8 frames, H, W, 3)")
    src.add_argument("--out-dir", help="output folder for --prompts-file: DIR/000.mp4, DIR/001.mp4, ...")
    src.add_argument("--format", default=None, choices=("mp4", "gif", "npy"),
                     help="file format with --out-dir (default mp4; with --out, its extension chooses)")
    src.add_argument("--skip-existing", action="store_true",
                     help="skip prompts whose files are complete (resume an interrupted run)")
    gen = p.add_argument_group("generation (defaults come from the model's config)")
    gen.add_argument("--seed", type=Seed, default=0, help="noise seed (default 0); with --prompts-file, the prompt "
                     "on line i (from 0) uses seed + i")
    gen.add_argument("--frames", type=Int(), default=None, help="frames per video (default: the model's)")
    gen.add_argument("--height", type=Int(), default=None, help="pixels (default: the model's; one of the sizes it "
                     "serves)")
    gen.add_argument("--width", type=Int(), default=None, help="pixels (default: the model's, or the one served with "
                     "--height)")
    gen.add_argument("--steps", type=Int(), default=None, help="content-model denoising steps (default: the model's)")
    gen.add_argument("--motion-steps", type=Int(), default=None, help="motion-DiT denoising steps (default: the "
                     "model's)")
    gen.add_argument("--guidance", type=Number(low=0.0), default=None, help="CFG scale of the content model "
                     "(default: the model's)")
    gen.add_argument("--motion-guidance", type=Number(low=0.0), default=None, help="CFG scale (text) of the motion "
                     "DiT (default: the model's)")
    gen.add_argument("--scheduler", default=None, help="ddim or dpm (DPM-Solver++ 2M) (default: the model's)")
    gen.add_argument("--num-videos", type=Int(), default=1, help="videos per prompt (default 1)")
    gen.add_argument("--motion-variations", type=Int(), default=1, help="motions per content frame (default 1)")
    gen.add_argument("--fps", type=Number(low=FPS_MIN, high=FPS_MAX), default=None,
                     help=f"frames per second of .mp4/.gif ({FPS_MIN:g} to {FPS_MAX:g}; default: the model's)")
    gen.add_argument("--cache", choices=("static", "dynamic"), default=None,
                     help="fewer denoiser evaluations: the model's calibrated reuse schedule (static, any backend) "
                     "or first-block change decisions (dynamic, eager/compile)")
    gen.add_argument("--cache-threshold", type=Number(low=0.0), default=None,
                     help="static: derive the schedule at this threshold; dynamic: skip below this relative change")
    gen.add_argument("--guidance-interval", type=Number(low=0.0, high=1.0), nargs=2, metavar=("START", "END"), default=None,
                     help="CFG only on the steps in this fraction of each loop, e.g. 0.2 0.8")
    eng = p.add_argument_group("engine")
    eng.add_argument("--model", default=None, help="'default' (shipped weights; the default), a model folder, or "
                     "random:<config>")
    add_lora_argument(eng)
    eng.add_argument("--backend", default="eager", help="eager (default), compile, cudagraph, onnxruntime or tensorrt")
    eng.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    eng.add_argument("--device", default="cpu", help=DEVICES_HELP + " (default cpu)")
    eng.add_argument("--batch-size", type=Int(), default=None, help=f"prompts per pipeline call with --prompts-file "
                     f"(default {DEFAULT_BATCH}, or the most the backend takes: ONNX exports hold 4 by default)")
    eng.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _check_image_flags(args, config) -> None:
    """With --image the content model does not run: its flags would be ignored, so they are refused (one line),
    except --steps / --guidance where the motion loop takes its count / scale from them (neither
    --motion-steps / --motion-guidance nor the model's config sets it)."""
    s = config.sampling
    ignored = []
    if args.steps is not None and (args.motion_steps is not None or s.motion_steps is not None):
        ignored.append("--steps")
    if args.guidance is not None and (args.motion_guidance is not None or s.motion_guidance is not None):
        ignored.append("--guidance")
    if args.negative_prompt is not None:
        ignored.append("--negative-prompt")
    if ignored:
        raise ValueError(f"{', '.join(ignored)} set(s) the content model, which --image replaces: nothing would "
                         "use it; drop it (--motion-steps and --motion-guidance set the motion loop)")


def _outputs(args, n_prompts: int, per_prompt: int) -> List[List[str]]:
    """Output paths, ``[prompt][video]``; checks format and folders (creating nothing)."""
    from engine.video_io import check_output_dir, check_output_path, check_writer

    if args.out is not None:
        check_output_path(args.out)
        if per_prompt == 1:
            return [[args.out]]
        stem, ext = os.path.splitext(args.out)
        return [[f"{stem}-{k}{ext}" for k in range(per_prompt)]]
    check_output_dir(args.out_dir)
    ext = "." + (args.format or "mp4")
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
    if args.out is not None and args.format is not None:
        raise ValueError(f"--format {args.format} applies to --out-dir; with --out the file's extension chooses the "
                         f"format ({args.out!r})")
    from engine.backends import check_backend_ready, get_backend
    from engine.default_model import resolve_model
    from engine.request import check_request, parse_device, parse_dtype

    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    backend = get_backend(args.backend)  # unknown or not-installed backends fail here
    if backend.name == "cudagraph" and device.type != "cuda":
        raise ValueError(f"backend 'cudagraph' needs --device cuda, got --device {args.device}")

    numbered = [(None, args.prompt)] if args.prompt is not None else read_prompts(args.prompts_file)
    prompts = [p for _, p in numbered]
    check_seed("--seed", args.seed, len(prompts))  # prompt i uses --seed + i
    spec = resolve_model(args.model)
    from engine.adapters import check_lora_args

    loras = check_lora_args(args.lora)  # the files, before any weights load
    config = spec.load_config()
    if args.image is not None:
        _check_image_flags(args, config)
    request = check_request(config, num_frames=args.frames, height=args.height, width=args.width,
                            num_inference_steps=args.steps, motion_steps=args.motion_steps, guidance_scale=args.guidance,
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
    # The config's frame rate too, before any work: the writer would refuse it only after generating.
    fps = args.fps if args.fps is not None else check_number("the config's sampling.fps", config.sampling.fps,
                                                             FPS_MIN, FPS_MAX)
    return dict(spec=spec, loras=loras, device=device, dtype=dtype, prompts=prompts, lines=[n for n, _ in numbered],
                request=request, image=image, outputs=outputs, fps=fps)


def _format_timings(timings: Dict[str, float]) -> str:
    order = ["text", "content", "motion", "decode", "vae", "write"]
    parts = [f"{k} {timings[k]:.3f}" for k in order if k in timings]
    total = sum(v for k, v in timings.items() if k != "total")
    return "timings (s): " + " | ".join(parts + [f"total {total:.3f}"])


def _check_prompt_lengths(encoder, plan, args) -> None:
    """Every prompt (and the negative prompt) fits the text encoder (:func:`engine.request.check_prompt_lengths`)."""
    from engine.request import check_prompt_lengths

    names = (["--prompt"] if args.prompt is not None
             else [f"line {n} of {args.prompts_file!r}" for n in plan["lines"]])
    texts = list(zip(names, plan["prompts"]))
    if args.negative_prompt is not None:
        texts.append(("--negative-prompt", args.negative_prompt))
    check_prompt_lengths(encoder, texts)


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
    if args.batch_size is None:
        args.batch_size = _default_batch(pipe, plan["request"], len(plan["prompts"]))
    pipe.check_backend(plan["request"], min(args.batch_size, len(plan["prompts"])))
    return plan, pipe


def _default_batch(pipe, request, num_prompts: int) -> int:
    """The largest batch up to :data:`DEFAULT_BATCH` prompts that the backend takes for ``request`` (exported
    graphs hold a fixed largest batch); 1 when none does, whose error :meth:`check_backend` then reports."""
    for batch in range(min(DEFAULT_BATCH, num_prompts), 1, -1):
        try:
            pipe.check_backend(request, batch)
            return batch
        except ValueError:
            continue
    return 1


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
