"""python -m trainer.recipes.render_clips: a folder of user-style clips for the adapter recipes.

    python -m trainer.recipes.render_clips --concept cyan --num-clips 240 --out clips/cyan

Writes ``OUT/clip-0000.mp4`` ... and ``OUT/captions.csv`` (``path,caption``): what a user's own folder of
videos looks like. The trainer reads it through the normal video path (``--data OUT``) and never learns that
the clips are rendered. The clips show the concept's train combinations (trainer/data/concepts.py; its
held-out ones never) with paraphrased captions, and a share of the base model's own train combinations
(``--base-fraction``) so that the adapter keeps what the model knew. Rendered at ``--size`` (default 64x64);
the trainer resizes them to each training size.
"""

import csv
import io
import os
import sys
from typing import List, Optional

from engine.atomic import atomic_dir, write_text
from engine.cli import Parser, run_main
from engine.video_io import write_video
from trainer.data.concepts import CONCEPTS, mixed_specs
from trainer.data.synthetic import render_clip


def build_parser():
    p = Parser(prog="python -m trainer.recipes.render_clips", description=__doc__.split("\n")[0])
    p.add_argument("--concept", required=True, choices=[c for c in CONCEPTS if c != "base"])
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    p.add_argument("--num-clips", type=int, default=240)
    p.add_argument("--base-fraction", type=float, default=0.25, help="share of clips from the base train split")
    p.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p


def render_folder(concept: str, out: str, num_clips: int, base_fraction: float = 0.25, size: int = 64,
                  frames: int = 16, fps: int = 8, seed: int = 0) -> int:
    """Render the folder ``out`` (written under a temporary name, then renamed: never half a folder)."""
    if num_clips < 1 or not 0.0 <= base_fraction <= 1.0 or size < 16 or frames < 2:
        raise ValueError(f"bad values: --num-clips {num_clips} (>= 1), --base-fraction {base_fraction} "
                         f"(in [0, 1]), --size {size} (>= 16), --frames {frames} (>= 2)")
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} exists already")
    rows: List[List[str]] = []
    with atomic_dir(out, durable=False) as tmp:
        for k, (caption, spec) in enumerate(mixed_specs(concept, num_clips, base_fraction, seed, frames, size, size)):
            name = f"clip-{k:04d}.mp4"
            write_video(os.path.join(tmp, name), render_clip(spec, frames, size, size), fps=fps)
            rows.append([name, caption])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([["path", "caption"]] + rows)
        write_text(os.path.join(tmp, "captions.csv"), text.getvalue())
    return len(rows)


def main(argv: Optional[List[str]] = None) -> int:
    def body():
        args = build_parser().parse_args(argv)
        n = render_folder(args.concept, args.out, args.num_clips, args.base_fraction, args.size, args.frames,
                          args.fps, args.seed)
        print(f"{n} clips in {args.out}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
