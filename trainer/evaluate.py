"""python -m trainer.evaluate: measure a CMD model folder.

    python -m trainer.evaluate --model runs/default/model --data synthetic --num-clips 256 --out eval.json
    torchrun --nproc-per-node 8 -m trainer.evaluate --model M --data DIR --metrics fvd --i3d i3d.pt --num-clips 2048

Metrics (``--metrics``, comma-separated; default: everything the inputs allow):

    recon       autoencoder reconstruction PSNR / SSIM on data clips (pixels, [-1, 1])
    attributes  synthetic data: generate a video for each held-out prompt, measure colour, shape and motion
                from its pixels (trainer.attributes.measure_attributes), report the accuracy of each and of all three
    fvd         Frechet distance of I3D features (trainer/i3d.py; --i3d FILE, a local weights file) between data
                clips and generated clips of the same captions (the FVD protocol uses 2048 clips)
    clipsim     mean CLIP similarity between generated frames and their caption (--clip DIR, a local CLIP folder)

``--size FxHxW`` evaluates at another clip size than the model's own (data rendered or read at that size,
videos generated at it); the results record the size and whether the model serves it (``served``): a
model's config declares a size (``sizes``) only once it was evaluated there.

Under torchrun every rank generates and measures its share of the prompts: the batches of --batch-size one
process would run, batch b on rank b mod N (``engine.distributed.shard_batches``, as ``engine.run`` deals
them), so each clip is the one a single process generates. Rank 0 merges the results (feature statistics are
summed, per-clip values gathered) and writes the JSON.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from engine.atomic import check_output, output_lock, write_json
from engine.cli import DataSeed, Int, Number, Parser, add_lora_argument, check_seed, run_ranks
from engine.distributed import DistInfo, gather_objects, init_distributed, shard_batches
from trainer.metrics import CLIPSimilarity, FeatureStats, frechet_from_stats, psnr, ssim

METRICS = ("recon", "attributes", "fvd", "clipsim")


# ------------------------------------------------------------------------------------------ attributes


def attribute_row(video: torch.Tensor, truth, wide: bool = False) -> Dict[str, Any]:
    """Measured vs true attributes of one clip. ``video``: (L, 3, H, W) in [-1, 1]; ``truth``: a ClipSpec or
    a dict with colour, shape and motion. ``wide``: name colours and motions from every one the synthetic
    vocabulary has (cyan, the diagonals), not only the base model's training ones."""
    from trainer.attributes import measure_attributes

    want = truth if isinstance(truth, dict) else {"colour": truth.colour, "shape": truth.shape,
                                                   "motion": truth.motion}
    got = measure_attributes(video, **_palette(wide))
    row = {key: got[key] == want[key] for key in ("colour", "shape", "motion")}
    row["all"] = all(row.values())
    row["stability"] = content_stability(video, got, wide)
    row["measured"] = {key: got[key] for key in ("colour", "shape", "motion")}
    row["expected"] = {key: want[key] for key in ("colour", "shape", "motion")}
    return row


def _palette(wide: bool) -> Dict[str, Any]:
    from trainer.data.synthetic import ALL_COLOURS, ALL_MOTIONS, COLOURS, MOTIONS

    return {"colours": ALL_COLOURS, "motions": ALL_MOTIONS} if wide else {"colours": COLOURS, "motions": MOTIONS}


def content_stability(video: torch.Tensor, clip: Dict[str, Any], wide: bool = False) -> float:
    """Fraction of frames whose own colour and shape (measured frame by frame) are the clip's: the object
    keeps its appearance while it moves. 0 when the clip has no measurable object."""
    from trainer.attributes import measure_attributes

    if clip["colour"] is None or clip["shape"] is None:
        return 0.0
    same = []
    for frame in video:
        got = measure_attributes(frame[None], **_palette(wide))
        same.append(got["colour"] == clip["colour"] and got["shape"] == clip["shape"])
    return float(np.mean(same))


def summarize_attributes(rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    if not rows:
        raise ValueError("no clips to measure")
    out = {f"{key}_accuracy": float(np.mean([r[key] for r in rows])) for key in ("colour", "shape", "motion", "all")}
    if all("stability" in r for r in rows):
        out["content_stability"] = float(np.mean([r["stability"] for r in rows]))
    out["clips"] = len(rows)
    return out


def attribute_accuracy(videos: Sequence[torch.Tensor], truths: Sequence) -> Dict[str, float]:
    """Accuracy of colour, shape, motion (and all three) measured from the pixels of ``videos``."""
    if len(videos) != len(truths):
        raise ValueError(f"{len(videos)} videos for {len(truths)} sets of attributes")
    return summarize_attributes([attribute_row(v, t) for v, t in zip(videos, truths)])


# ------------------------------------------------------------------------------------------ generation


def generate(pipe, prompts: Sequence[str], indices: Sequence[int], seed: int, batch_size: int = 8,
             **kwargs) -> torch.Tensor:
    """Videos (N, L, 3, H, W) in [-1, 1] for ``prompts``; prompt ``indices[i]`` (its index in the whole list)
    seeds its noise with ``seed + index``, so a clip does not depend on how prompts are sharded or batched."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        gens = [torch.Generator().manual_seed(seed + int(i)) for i in indices[start:start + batch_size]]
        frames = pipe(chunk, generator=gens, output_type="pt", progress=False, **kwargs).frames
        out.append(frames.float().cpu() * 2 - 1)
    return torch.cat(out) if out else torch.empty(0)


# ------------------------------------------------------------------------------------------ evaluation


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m trainer.evaluate", description="Evaluate a CMD model folder")
    p.add_argument("--model", required=True, help="CMD model folder (written by trainer.train)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a video folder (captions CSV / UCF-101)")
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--num-clips", type=Int(2), default=64, help="clips (prompts) in all, over all ranks")
    p.add_argument("--split", default="heldout", help="synthetic split of the prompts: heldout or train")
    p.add_argument("--paraphrase", action="store_true",
                   help="synthetic prompts in paraphrased form (synonyms, templates) instead of canonical")
    p.add_argument("--batch-size", type=Int(), default=8)
    p.add_argument("--steps", type=Int(), help="content sampling steps (config default)")
    p.add_argument("--motion-steps", type=Int(), help="motion sampling steps (config default)")
    p.add_argument("--guidance", type=Number(low=0.0))
    p.add_argument("--motion-guidance", type=Number(low=0.0))
    p.add_argument("--seed", type=DataSeed, default=0, help="clip i is seeded --seed + i")
    p.add_argument("--cache", choices=("static", "dynamic"), help="sample with step caching (engine.cache)")
    p.add_argument("--cache-threshold", type=Number(low=0.0), help="the cache's threshold (see engine.run)")
    p.add_argument("--guidance-interval", type=Number(low=0.0, high=1.0), nargs=2, metavar=("START", "END"),
                   help="CFG only on this fraction of each sampling loop")
    p.add_argument("--size", help="clip size FRAMESxHEIGHTxWIDTH to evaluate at (default: the model's own); a size "
                                  "the model does not serve yet is evaluated as a candidate for its config's sizes")
    p.add_argument("--i3d", help="I3D weights file for FVD (.pt state dict or .safetensors)")
    p.add_argument("--i3d-size", type=Int(), default=224, help="frame size the I3D sees (224 in the protocol)")
    p.add_argument("--clip", help="local CLIP folder for CLIPSIM")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--concept", help="synthetic prompts of an adapter's concept (trainer/data/concepts.py: base, "
                   "cyan, diagonal), measured naming every colour and motion (cyan and the diagonals included)")
    add_lora_argument(p)
    return p


def _metrics(args) -> List[str]:
    if args.metrics:
        chosen = [m.strip() for m in args.metrics.split(",") if m.strip()]
        bad = [m for m in chosen if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metric {bad[0]!r}; choose from {', '.join(METRICS)}")
        if "fvd" in chosen and not args.i3d:
            raise ValueError("metric 'fvd' needs --i3d FILE (local I3D weights)")
        if "clipsim" in chosen and not args.clip:
            raise ValueError("metric 'clipsim' needs --clip DIR (a local CLIP folder)")
        if "attributes" in chosen and args.data != "synthetic":
            raise ValueError("metric 'attributes' needs --data synthetic (known attributes)")
        return chosen
    chosen = ["recon"] + (["attributes"] if args.data == "synthetic" else [])
    return chosen + (["fvd"] if args.i3d else []) + (["clipsim"] if args.clip else [])


def _items(args, cfg):
    """(captions, truths or None, a function index -> real video (L, 3, H, W)) for all ranks alike."""
    if args.data == "synthetic":
        from trainer.data import frames_to_tensor, prompts_for, render_clip
        from trainer.data.concepts import concept_prompts

        make = (lambda *a, **k: concept_prompts(args.concept, *a, **k)) if args.concept else prompts_for
        pairs = make(args.split, args.num_clips, seed=args.seed, paraphrase=args.paraphrase,
                     num_frames=cfg.num_frames, height=cfg.height, width=cfg.width)
        captions = [c for c, _ in pairs]
        specs = [s for _, s in pairs]
        return captions, specs, lambda i: frames_to_tensor(render_clip(specs[i], cfg.num_frames, cfg.height, cfg.width))
    from trainer.data.videos import open_video_folder

    data = open_video_folder(args.data, cfg.num_frames, cfg.height, cfg.width, seed=args.seed, split="test")
    # Unreadable videos are skipped (and counted) before the prompts are fixed, so every rank agrees.
    good = [i for i in range(len(data)) if data[i] is not None][: args.num_clips]
    skipped = len(data) - len(good) if len(good) < args.num_clips else None
    captions = [data.entries[i][1] for i in good]
    if skipped:
        print(f"note: {skipped} unreadable or too-short videos skipped", file=sys.stderr)
    return captions, None, lambda i: data[good[i]]["video"]


def eval_size(model: str, size: Optional[str] = None):
    """The clip size to evaluate a model spec at: ``size`` ("FxHxW"), else the model's own size. A
    one-line ValueError if its networks cannot run it; it need not be a size the model serves yet
    (evaluating a candidate is how a size gets declared)."""
    from engine.default_model import resolve_model
    from engine.geometry import ClipSize, check_fits

    config = resolve_model(model).load_config()
    return check_fits(config, ClipSize.parse(size)) if size else config.default_size


def evaluate(args, info: DistInfo) -> Dict[str, Any]:
    """Run the chosen metrics on this rank's share; every rank returns the merged results."""
    from engine.pipeline import CMDPipeline

    metrics = _metrics(args)
    check_seed("--seed", args.seed, args.num_clips, low=0)  # clip i is seeded --seed + i
    device = info.device
    size = eval_size(args.model, args.size)  # before loading any weights
    if args.concept:
        from trainer.data.concepts import get_concept

        get_concept(args.concept)
    from engine.adapters import check_lora_args, load_lora_args

    loras = check_lora_args(args.lora)
    pipe = CMDPipeline.from_pretrained(args.model, device=str(device), dtype=args.dtype)
    load_lora_args(pipe, loras)
    served = size in pipe.config.served_sizes
    if size != pipe.config.default_size:
        # Data, generation and reconstruction at this size: the config's own size becomes it for this run
        # (the networks do not depend on it; it is what check_request and the data read).
        pipe.config = pipe.model.config = pipe.config.with_size(size)
    cfg = pipe.config
    cache = {k: v for k, v in (("cache", args.cache), ("cache_threshold", args.cache_threshold),
                               ("guidance_interval", args.guidance_interval)) if v is not None}
    if cache:  # checked before any work
        from engine.cache import plan_cache

        req = pipe.check_inputs(num_inference_steps=args.steps, motion_steps=args.motion_steps)
        plan_cache(cfg, req.scheduler, req.steps, req.motion_steps, backend=pipe.backend, **cache)
    captions, truths, real_video = _items(args, cfg)
    # This rank's batches, flattened: generate() and the loops below cut them again at --batch-size, which
    # gives back the same batches (only the last batch of all is short, and it is its rank's last).
    mine = [i for batch in shard_batches(len(captions), args.batch_size, info) for i in batch]
    from engine.default_model import resolve_model

    spec = resolve_model(args.model)
    model = os.path.abspath(spec.path) if spec.path else args.model  # "default" -> the shipped folder
    results: Dict[str, Any] = {"model": model, "data": args.data, "clips": len(captions),
                               "split": args.split, "paraphrase": args.paraphrase, "size": str(size),
                               "served": served, "world_size": info.world_size, "concept": args.concept,
                               "lora": list(args.lora),
                               **({"sampling_cache": cache} if cache else {})}
    t0 = time.perf_counter()

    if "recon" in metrics:
        results.update(_reconstruction(pipe, mine, real_video, args.batch_size, info))

    need_generation = any(m in metrics for m in ("attributes", "fvd", "clipsim"))
    if need_generation:
        kwargs = {k: v for k, v in (("num_inference_steps", args.steps), ("motion_steps", args.motion_steps),
                                    ("guidance_scale", args.guidance),
                                    ("motion_guidance_scale", args.motion_guidance), ("cache", args.cache),
                                    ("cache_threshold", args.cache_threshold),
                                    ("guidance_interval", args.guidance_interval)) if v is not None}
        fake = generate(pipe, [captions[i] for i in mine], mine, args.seed, args.batch_size, **kwargs)

    if "attributes" in metrics:
        wide = args.concept is not None
        rows = [dict(attribute_row(fake[k], truths[i], wide), caption=captions[i], index=i) for k, i in enumerate(mine)]
        rows = sorted(gather_objects(rows, info), key=lambda r: r["index"])
        results["attributes"] = summarize_attributes(rows)
        results["attribute_rows"] = [{k: r[k] for k in ("index", "caption", "measured", "expected")} for r in rows]

    if "fvd" in metrics:
        results["fvd"] = _fvd(args, mine, real_video, fake, info)
    if "clipsim" in metrics:
        results["clipsim"] = _clipsim(args, mine, captions, fake, info)

    results["seconds"] = time.perf_counter() - t0
    return results


def _reconstruction(pipe, mine, real_video, batch_size: int, info: DistInfo) -> Dict[str, float]:
    """Mean PSNR / SSIM of the autoencoder's encode-decode of this rank's real clips, merged over ranks."""
    rows = []
    ae, cfg, device = pipe.model.autoencoder, pipe.config, info.device
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        video = torch.stack([real_video(i) for i in idx]).to(device)
        with torch.no_grad():
            x = video
            if cfg.space == "latent":
                from engine.models.vae import encode_frames

                x = encode_frames(pipe.model.vae, video.to(pipe.dtype))
            recon = pipe.decode_latents(*ae.encode(x.to(pipe.dtype))).clamp(-1, 1).cpu()
        video = video.float().cpu()
        rows += list(zip(psnr(recon, video).tolist(), ssim(recon, video).tolist()))
    rows = gather_objects(rows, info)
    return {"recon_psnr": float(np.mean([r[0] for r in rows])), "recon_ssim": float(np.mean([r[1] for r in rows]))}


def _fvd(args, mine, real_video, fake, info: DistInfo) -> float:
    """FVD between this run's real and generated clips (I3D features from ``--i3d``), merged over ranks."""
    from trainer.i3d import I3DFeatures

    features = I3DFeatures(args.i3d, size=args.i3d_size, device=info.device)
    real_stats, fake_stats = FeatureStats(), FeatureStats()
    for start in range(0, len(mine), args.batch_size):
        idx = mine[start:start + args.batch_size]
        real_stats.add(features(torch.stack([real_video(i) for i in idx])))
        fake_stats.add(features(fake[start:start + args.batch_size]))
    merged = [FeatureStats(), FeatureStats()]
    for real_part, fake_part in gather_objects([(real_stats, fake_stats)], info):
        merged[0].merge(real_part)
        merged[1].merge(fake_part)
    return frechet_from_stats(*merged)


def _clipsim(args, mine, captions, fake, info: DistInfo) -> float:
    """Mean CLIP similarity of generated clips and their captions (``--clip`` weights), merged over ranks."""
    scorer = CLIPSimilarity(args.clip, device=info.device)
    scores = []
    for start in range(0, len(mine), args.batch_size):
        idx = mine[start:start + args.batch_size]
        scores += scorer(fake[start:start + args.batch_size], [captions[i] for i in idx]).tolist()
    return float(np.mean(gather_objects(scores, info)))


def main(argv: Optional[List[str]] = None) -> int:
    def body(joined) -> int:
        args = build_parser().parse_args(argv)
        if args.out:
            check_output(args.out)  # before the evaluation, not after it
        info = joined(init_distributed(args.device))
        results = evaluate(args, info)
        if info.is_main:
            summary = {k: v for k, v in results.items() if k != "attribute_rows"}
            print(json.dumps(summary, indent=1))
            if args.out:
                with output_lock(args.out, "--out"):  # one writer at a time (another one refuses)
                    write_json(args.out, results, indent=1)
        return 0

    return run_ranks(body)  # bad input: one line, exit 2; Ctrl-C: exit 130; the rank leaves its group


if __name__ == "__main__":
    sys.exit(main())
