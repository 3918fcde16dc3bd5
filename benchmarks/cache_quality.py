"""Step caching on the shipped default model (issue 17): evaluations, time and quality, in one run.

The engine's side (``engine.bench.bench_cache``: denoiser evaluations per video, wall time per video,
PSNR/SSIM against the uncached videos; ``engine.bench.cache_flops``: the same evaluation counts at paper
scale) plus the trainer's side: colour, shape and direction accuracy measured from the pixels
(``trainer.evaluate.attribute_accuracy``, the evaluator's own measurement). The engine cannot import the
trainer (cmd_kernels <- engine <- trainer), so this script, which may import both, joins them: every setting
generates the same videos it scores, once.

Prompts: the held-out attribute combinations (``--split train``: training ones, to choose settings without
looking at the evaluation), canonical and paraphrased (``trainer.data.prompts_for``), ``--num-clips`` each,
prompt i of a part seeded ``--seed + i`` as ``python -m trainer.evaluate`` does, so the uncached row
reproduces the model card's evaluation.

    python benchmarks/cache_quality.py                      # 64 + 64 clips, the default settings
    python benchmarks/cache_quality.py --num-clips 8 --settings none,static --flops-config default   # a smoke run
    python benchmarks/cache_quality.py --size 16x64x64 --settings none,static --name cache-default-cpu-64

Writes ``<out>/<name>.json`` (raw) and prints a Markdown table (the one in BENCHMARKS.md).
"""

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: the packages live at the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.atomic import check_output, write_json  # noqa: E402
from engine.bench import (DEFAULT_CACHE_SETTINGS, jsonable, bench_cache, cache_flops,  # noqa: E402
                          parse_cache_setting)
from engine.cli import DataSeed, Int, Parser, check_seed, run_main  # noqa: E402
from engine.geometry import ClipSize, check_served  # noqa: E402
from engine.pipeline import CMDPipeline  # noqa: E402
from cmd_kernels.measure import environment  # noqa: E402
from trainer.data import prompts_for  # noqa: E402
from trainer.evaluate import attribute_accuracy  # noqa: E402

PARAPHRASE = (False, True)  # each split's prompts canonical, then paraphrased


def markdown(report: dict) -> str:
    """The table of BENCHMARKS.md: one row per setting."""
    flops = report.get("flops") or {}
    head = ("| setting | UNet evals | DiT evals | first-block only | fewer full evals | s / video (median) | "
            "speed-up | PSNR dB | SSIM | colour | shape | direction | all three |")
    head += " TFLOPs (paper scale) |" if flops else ""
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in report["settings"].items():
        ev = r["evaluations_per_video"]
        first = ev.get("content_first_block", 0) + ev.get("motion_first_block", 0)
        acc = {k: [part[f"{k}_accuracy"] for part in r["score"].values()] for k in ("colour", "shape", "motion", "all")}
        cells = [f"`{name}`", f"{ev['content']:.1f}", f"{ev['motion']:.1f}", f"{first:.1f}",
                 f"{r['fewer_evaluations']:.2f}x", f"{r['seconds_per_video_median']:.2f}", f"{r['speedup']:.2f}x",
                 "identical" if r["psnr_db"] is None or r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}",
                 f"{r['ssim']:.3f}"]
        cells += [" / ".join(f"{100 * v:.0f}%" for v in acc[k]) for k in ("colour", "shape", "motion", "all")]
        if flops:
            entry = flops["settings"][name]
            cells.append(f"{entry['tflops_per_video']:.1f} ({100 * entry['flops_saved']:.0f}% saved)")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = Parser(prog="python benchmarks/cache_quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--num-clips", type=Int(), default=64, help="prompts per part (canonical, paraphrased)")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"),
                   help="attribute combinations: held-out (the evaluation) or training ones (to choose settings)")
    p.add_argument("--settings", default=DEFAULT_CACHE_SETTINGS, help="as engine.bench cache --settings")
    p.add_argument("--batch-size", type=Int(), default=8)
    p.add_argument("--seed", type=DataSeed, default=0)
    p.add_argument("--size", default=None,
                   help="clip size FRAMESxHEIGHTxWIDTH, one the model serves (default: the model's own)")
    p.add_argument("--threads", type=Int(), default=None, help="torch threads (default: torch's)")
    p.add_argument("--flops-config", default="sd21-512x1024", help="count the FLOPs at this config's scale "
                   "('' to skip)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="cache-default-cpu")
    return run_main(lambda: _run(p.parse_args(argv)))


def _run(args) -> int:
    check_seed("--seed", args.seed, args.num_clips, low=0)  # prompt i of a part is seeded --seed + i
    check_output(args.out, folder=True)  # before the long run, not after it
    settings = {t.strip(): parse_cache_setting(t) for t in args.settings.split(",") if t.strip()}
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = CMDPipeline.from_pretrained(args.model)
    size = check_served(pipe.config, ClipSize.parse(args.size)) if args.size else pipe.config.default_size
    dims = dict(num_frames=size.frames, height=size.height, width=size.width)
    prompts, truths, seeds, bounds = [], [], [], {}
    for paraphrase in PARAPHRASE:
        split = args.split + ("_paraphrase" if paraphrase else "")
        items = prompts_for(args.split, args.num_clips, seed=args.seed, paraphrase=paraphrase, **dims)
        bounds[split] = (len(prompts), len(prompts) + len(items))
        prompts += [c for c, _ in items]
        truths += [s for _, s in items]
        seeds += [args.seed + i for i in range(len(items))]

    def score(videos):
        return {split: attribute_accuracy(videos[a:b], truths[a:b]) for split, (a, b) in bounds.items()}

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = bench_cache(pipe, prompts, settings, args.seed, args.batch_size, score=score, seeds=seeds, **dims)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    flops = cache_flops(args.flops_config, results) if args.flops_config else None
    env = environment(pipe.device, pipe.dtype)
    env["load_average_1_5_15_before"] = [round(v, 2) for v in load_before]
    env["load_average_1_5_15_after"] = [round(v, 2) for v in load_after]
    env["platform"] = platform.platform()
    req = pipe.check_inputs(**dims)
    report = {"kind": "cache", "model": args.model, "environment": env, "wall_s": wall,
              "prompts": {split: {"clips": b - a, "paraphrase": para, "seeds": f"{args.seed}..{args.seed + b - a - 1}"}
                          for para, (split, (a, b)) in zip(PARAPHRASE, bounds.items())},
              "shape": {"frames": req.num_frames, "height": req.height, "width": req.width, "steps": req.steps,
                        "motion_steps": req.motion_steps, "scheduler": req.scheduler, "guidance": req.guidance,
                        "motion_guidance": req.motion_guidance, "batch": args.batch_size},
              "settings": results, "flops": flops}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.name}.json")
    write_json(path, jsonable(report), indent=1)
    print(markdown(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
