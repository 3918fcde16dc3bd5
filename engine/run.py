"""python -m engine.run: text -> video files, a thin layer over :class:`engine.pipeline.CMDPipeline`.

    python -m engine.run --prompt "a red circle moving right" --out red.mp4
    python -m engine.run --prompts-file prompts.txt --out-dir videos/      # videos/000.mp4, 001.mp4, ...

Everything is checked before any work and any file: a bad value gets one line ``error: ...`` on
stderr and exit code 2. Files are written atomically, so an error or Ctrl-C (exit 130) leaves no
partial file. With ``--prompts-file``, prompt i (0-based) uses seed ``--seed + i``: its video equals
``--prompt <line i> --seed <seed + i>``.
"""

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Tuple

DEVICES_HELP = "cpu, cuda or cuda:N"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as ValueError; main prints them and exits 2)."""

    def error(self, message):
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.run", description="Generate videos from text with a CMD model.")
    src = p.add_argument_group("prompts and outputs")
    src.add_argument("--prompt", help="the text of one video (or several with --num-videos)")
    src.add_argument("--prompts-file", help="a text file, one prompt a line (blank lines skipped); needs --out-dir")
    src.add_argument("--negative-prompt", default=None, help="what the content frame should not show")
    src.add_argument("--image", default=None, help="image-to-video: this image becomes the content frame")
    src.add_argument("--out", help="output file: .mp4, .gif or .npy (uint8 frames, H, W, 3)")
    src.add_argument("--out-dir", help="output folder for --prompts-file: DIR/000.mp4, DIR/001.mp4, ...")
    src.add_argument("--format", default="mp4", choices=("mp4", "gif", "npy"), help="file format with --out-dir")
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
    eng = p.add_argument_group("engine")
    eng.add_argument("--model", default=None, help="'default' (shipped weights), a model folder, or random:<config>")
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


def _read_prompts(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"prompts file not found: {path!r}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path!r}: {e}") from None
    if not prompts:
        raise ValueError(f"no prompts in {path!r}")
    return prompts


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

    from engine.backends import get_backend
    from engine.default_model import resolve_model
    from engine.pipeline import check_request, parse_device, parse_dtype

    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    backend = get_backend(args.backend)  # unknown or not-installed backends fail here
    if backend.name == "cudagraph" and device.type != "cuda":
        raise ValueError(f"backend 'cudagraph' needs --device cuda, got --device {args.device}")

    prompts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts_file)
    spec = resolve_model(args.model)
    config = spec.load_config()
    request = check_request(config, num_frames=args.frames, height=args.height, width=args.width,
                            num_inference_steps=steps, motion_steps=motion_steps, guidance_scale=args.guidance,
                            motion_guidance_scale=args.motion_guidance, scheduler=args.scheduler,
                            num_videos_per_prompt=args.num_videos, motion_variations=args.motion_variations)
    image = None
    if args.image is not None:
        from engine.video_io import read_image

        image = read_image(args.image)
    outputs = _outputs(args, len(prompts), request.num_videos * request.motion_variations)
    fps = args.fps if args.fps is not None else float(config.sampling.get("fps", 8))
    return dict(spec=spec, device=device, dtype=dtype, prompts=prompts, request=request, image=image,
                outputs=outputs, fps=fps)


def _format_timings(timings: Dict[str, float]) -> str:
    order = ["text", "content", "motion", "decode", "vae", "write"]
    parts = [f"{k} {timings[k]:.3f}" for k in order if k in timings]
    total = sum(v for k, v in timings.items() if k != "total")
    return "timings (s): " + " | ".join(parts + [f"total {total:.3f}"])


def run(args) -> Tuple[List[str], Dict[str, float]]:
    """Validate, load, generate in batches, write. Returns the written paths and summed timings."""
    import time

    plan = _plan(args)
    from engine.pipeline import CMDPipeline
    from engine.video_io import write_video

    pipe = CMDPipeline.from_pretrained(plan["spec"], device=plan["device"], dtype=plan["dtype"],
                                       backend=args.backend)
    req, prompts, outputs = plan["request"], plan["prompts"], plan["outputs"]
    # The backend's limits (exported graphs' sizes and batches) for the largest batch, before any work.
    pipe.check_inputs(min(args.batch_size, len(prompts)), plan["image"] is not None, num_frames=req.num_frames,
                      height=req.height, width=req.width, num_inference_steps=req.steps, motion_steps=req.motion_steps,
                      guidance_scale=req.guidance, motion_guidance_scale=req.motion_guidance, scheduler=req.scheduler,
                      num_videos_per_prompt=req.num_videos, motion_variations=req.motion_variations)
    written, totals = [], {}
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        result = pipe(batch, negative_prompt=args.negative_prompt, num_frames=req.num_frames, height=req.height,
                      width=req.width, num_inference_steps=req.steps, motion_steps=req.motion_steps,
                      guidance_scale=req.guidance, motion_guidance_scale=req.motion_guidance,
                      scheduler=req.scheduler, num_videos_per_prompt=req.num_videos,
                      generator=args.seed + start, image=plan["image"], motion_variations=req.motion_variations,
                      progress=not args.quiet)
        t0 = time.perf_counter()
        paths = [p for row in outputs[start:start + len(batch)] for p in row]
        if args.out_dir is not None:
            os.makedirs(args.out_dir, exist_ok=True)
        for path, frames in zip(paths, result.frames):
            write_video(path, frames, fps=plan["fps"])
            written.append(path)
            print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
                  f"{plan['fps']:g} fps)", flush=True)
        result.timings["write"] = time.perf_counter() - t0
        for k, v in result.timings.items():
            totals[k] = totals.get(k, 0.0) + v
    return written, totals


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _, timings = run(args)
    except (ValueError, FileNotFoundError) as e:
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no partial file was left", file=sys.stderr)
        return 130
    print(_format_timings(timings), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
