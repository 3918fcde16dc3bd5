"""python -m trainer.train: train one CMD stage; the result is a model folder the engine loads.

    python -m trainer.train --stage autoencoder --config default --data synthetic --out runs/default
    python -m trainer.train --stage content --data synthetic --out runs/default     # --init runs/default/model
    python -m trainer.train --stage motion  --data synthetic --out runs/default
    python -m engine.run --model runs/default/model --prompt "a red circle moving right" --out red.mp4

Every stage writes into ``--out``::

    model/                      a CMD model folder (CMDModel.save_pretrained): the EMA weights of the trained
                                network beside the networks of --init (the frozen AE, earlier stages); written
                                at every checkpoint and at the end
    checkpoints/<stage>/step-N  training state (trainer/checkpoint.py), the last --keep of them
    logs/<stage>.jsonl          one JSON line per logged step (TensorBoard events too, when installed)
    samples/<stage>/step-N.gif  sample videos from the EMA weights (trainer/preview.py)

A run folder has one owner at a time: the run holds its lock (``engine.atomic.output_lock``; rank 0 under
torchrun) until it ends, and a second run given the same ``--out`` refuses in one line. A stage starts in a
folder that already holds that stage's run (its checkpoints or log; for the autoencoder stage, any model/)
only with ``--resume`` (continue it) or ``--overwrite`` (delete that stage's checkpoints, log, samples, and
for the autoencoder stage model/, then start again); otherwise it refuses in one line.

The content and motion stages start from the model folder of the stage before (``--init``, by default
``<out>/model``), keep its networks frozen and replace only their own. Under ``torchrun`` every rank
trains on its shard of each epoch (DistributedSampler) with DDP (gloo on CPU, nccl on CUDA).

Video folders are checked before training (every video probed, without decoding): the unusable ones
(missing, unreadable, too short for one clip) are left out and counted in the start record of the log
and on stderr; with none left, or fewer than one batch, the run stops with one line ``error: ...`` naming
the folder and the counts (exit code 2).

``--sizes`` trains at several clip sizes (synthetic data, or a video folder's videos resized): each batch holds clips of one size, the sizes taken
in turn batch by batch (``--sizes 16x32x32,16x64x64,16x64x64`` gives 64x64 two batches in three); clip i is
the same scene at every size (the synthetic spec scales with the frame), and the (xbar, z) cache holds it
per size. The config's ``train.<stage>.sizes`` gives the default, else the config's own size alone.

``--resume`` continues exactly: weights, optimizer, EMA, the data
position and every random state (the noise generator, torch CPU/CUDA, numpy, Python ``random``) are those
of an uninterrupted run at the same step.
"""

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from engine.atomic import check_output
from engine.distributed import owned_output
from engine.cli import TRAIN_SEED_MAX, Int, Number, Parser, UsageError, check_int, check_number, run_ranks
from engine.configs import CMDConfig, load_config
from engine.models import CMDModel
from engine.models.bundle import CONFIG_FILE, build_motion_dit
from engine.model_folder import check_model_folder, check_tensors
from engine.models.content import build_content_unet, find_content_unet, load_content_unet
from engine.models.vae import find_vae, load_vae
from trainer import checkpoint as ckpt
from trainer.distributed import DistInfo, barrier, gather_objects, init_distributed, mean_across_ranks
from trainer.ema import EMA
from trainer.stages import NETWORK_OF, TRAINING_STAGES, make_stage
from trainer.text_cache import CaptionEmbeddings

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m trainer.train", description=__doc__.split("\n")[0])
    p.add_argument("--stage", required=True, choices=TRAINING_STAGES)
    p.add_argument("--config", help="config name or JSON file (default: the --init folder's, else 'default')")
    p.add_argument("--data", default="synthetic", help="'synthetic', a folder of videos with captions.csv, "
                   "or a UCF-101 folder")
    p.add_argument("--out", required=True, help="run folder (model/, checkpoints/, logs/, samples/)")
    p.add_argument("--init", help="model folder of the previous stage (content/motion; default <out>/model); "
                                  "for the autoencoder stage, a model folder to continue from")
    p.add_argument("--finetune", action="store_true",
                   help="content/motion stage: continue training the --init folder's network of this stage "
                        "instead of a freshly initialised one")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="autoencoder stage: train the decoder only (the encodings of --init stay valid)")
    p.add_argument("--steps", type=Int(), help="total optimizer steps (config: train.<stage>.steps)")
    p.add_argument("--batch-size", type=Int(), help="clips per step per process (config: train.<stage>.batch_size)")
    p.add_argument("--lr", type=Number(above=0.0), help="peak learning rate (config: train.<stage>.lr)")
    p.add_argument("--sizes", help="comma-separated clip sizes FxHxW, one per batch in turn, a size repeated to "
                                   "weight it (config: train.<stage>.sizes; default: the config's own size); "
                                   "video folders are resized to each (pixel space)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this stage")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds a run of this stage: delete its checkpoints, log and samples (autoencoder "
                        "stage: and model/) and start again")
    p.add_argument("--seed", type=Int(0, TRAIN_SEED_MAX), default=0,
                   help=f"0 to {TRAIN_SEED_MAX} (numpy's global seed takes 32 bits)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="autocast dtype (config: train.<stage>.precision)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--threads", type=Int(), help="CPU threads per process (default: cores / local processes)")
    p.add_argument("--workers", type=Int(0), help="DataLoader workers (default: 0 for synthetic data, else 2)")
    p.add_argument("--num-clips", type=Int(), default=20000, help="size of the synthetic data set")
    p.add_argument("--checkpoint-every", type=Int(), help="steps between checkpoints (and model exports)")
    p.add_argument("--keep", type=Int(), default=3, help="checkpoints kept")
    p.add_argument("--log-every", type=Int(), help="steps between log lines")
    p.add_argument("--sample-every", type=Int(0), help="steps between sample videos (default: --checkpoint-every; "
                   "0: never)")
    p.add_argument("--num-samples", type=Int(), default=4, help="clips in each sample grid")
    p.add_argument("--text-cache", help="caption embedding file (trainer/text_cache.py): read at the start")
    p.add_argument("--no-encoding-cache", action="store_true",
                   help="re-run the frozen encoder on every batch instead of caching (xbar, z) per synthetic clip")
    p.add_argument("--vae", help="latent mode: a Stable Diffusion folder (or a VAE folder) for the image VAE")
    p.add_argument("--pretrained-unet", help="content stage: fine-tune the UNet of this Stable Diffusion folder")
    p.add_argument("--latent-cache", help="latent mode: folder for per-video VAE latents (video folders)")
    p.add_argument("--frame-stride", type=Int(), default=1, help="video folders: take every N-th frame")
    p.add_argument("--random-crop", action="store_true", help="video folders: random instead of centre crops")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--lora", type=int, metavar="RANK", help="train a LoRA adapter of this rank on the frozen "
                   "--init network of the stage (written to <out>/adapter.safetensors; trainer/lora.py)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (scaling alpha/rank; default: the rank)")
    p.add_argument("--lora-targets", help="comma-separated module-name suffixes, or re:REGEX of whole module "
                   "names (default: engine.adapters.DEFAULT_TARGETS of the stage's network)")
    return p


def hyperparams(cfg: CMDConfig, args) -> Dict[str, Any]:
    """The stage's hyper-parameters: the config's ``train.<stage>`` (its defaults in
    :class:`engine.configs.StageTrainConfig`) < command-line flags."""
    hp = dataclasses.asdict(cfg.train.stage(args.stage))
    for key in ("steps", "batch_size", "lr", "precision", "checkpoint_every", "log_every"):
        value = getattr(args, key)
        if value is not None:
            hp[key] = value
    # The config's values too (the flags were checked while parsing): the same rules (engine.cli).
    for key in ("steps", "batch_size", "checkpoint_every", "log_every"):
        hp[key] = check_int(key.replace("_", "-"), hp[key], 1)
    hp["lr"] = check_number("lr", hp["lr"], above=0.0)
    hp["betas"] = tuple(hp["betas"])
    sizes = getattr(args, "sizes", None)
    hp["sizes"] = train_sizes(cfg, sizes if sizes is not None else hp.get("sizes"))
    if hp["sizes"] != [str(cfg.default_size)] and cfg.space == "latent" and getattr(args, "data", "synthetic") != "synthetic":
        raise UsageError(f"--sizes {','.join(hp['sizes'])}: in latent space, sizes other than the config's own "
                         f"({cfg.default_size}) need --data synthetic (the latent cache holds one size)")
    check_flags(args)
    if getattr(args, "freeze_encoder", False):
        hp["freeze_encoder"] = True
    return hp


def check_flags(args) -> None:
    """The flag combinations that make no sense whatever the folders hold: a UsageError naming them, checked
    before any folder is read (so that it is the error a user sees, not a missing folder's)."""
    if getattr(args, "overwrite", False) and args.resume:
        raise UsageError("--resume continues the run in --out, --overwrite starts it again: give one")
    if getattr(args, "freeze_encoder", False) and args.stage != "autoencoder":
        raise UsageError("--freeze-encoder applies to the autoencoder stage only")
    if getattr(args, "lora", None) is not None:
        for flag in ("finetune", "freeze_encoder", "pretrained_unet"):
            if getattr(args, flag, None):
                raise UsageError(f"--lora trains an adapter on the --init network: --{flag.replace('_', '-')} "
                                 "does not apply")
        if not getattr(args, "init", None):
            raise UsageError("--lora needs --init MODEL (the base model the adapter is for)")
    elif getattr(args, "lora_alpha", None) is not None or getattr(args, "lora_targets", None) is not None:
        raise UsageError("--lora-alpha and --lora-targets need --lora RANK")
    if getattr(args, "finetune", False):
        if args.stage == "autoencoder":
            raise UsageError("--finetune applies to the content and motion stages (the autoencoder stage "
                             "continues from --init already)")
        if getattr(args, "pretrained_unet", None):
            raise UsageError("--finetune and --pretrained-unet both choose the starting UNet: give one")


def train_sizes(cfg: CMDConfig, sizes) -> List[str]:
    """The per-batch size cycle: ``sizes`` ("FxHxW,FxHxW" or a list of sizes; None: the config's own size)
    as "FxHxW" strings, each checked to fit the config's networks (:func:`engine.geometry.check_fits`).
    Repeats are kept (they weight a size). Raises UsageError naming the bad size."""
    from engine.geometry import ClipSize, check_fits

    if sizes is None:
        return [str(cfg.default_size)]
    items = [s.strip() for s in sizes.split(",")] if isinstance(sizes, str) else list(sizes)
    if not items or any(s == "" for s in items):
        raise UsageError(f"--sizes is a comma-separated list of FxHxW sizes, got {sizes!r}")
    try:
        return [str(check_fits(cfg, ClipSize.coerce(s))) for s in items]
    except ValueError as e:
        raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------------------------------
# Models


def _frozen_fields(cfg: CMDConfig) -> Dict[str, Any]:
    """What the later stages inherit and must agree on with the stage-1 model."""
    d = cfg.to_dict()
    return {k: d[k] for k in ("space", "channels", "num_frames", "height", "width", "vae_scale", "autoencoder")}


def run_model_dir(out: str) -> str:
    """The model folder a run folder holds (the EMA export; the later stages' default --init)."""
    return os.path.join(out, "model")


def check_stage_one_out(out: str) -> None:
    """A stage-1 run that builds its model from the config writes a new bundle, untrained content UNet and
    motion DiT included, to ``out/model``: refuse (UsageError, one line) where that folder already holds the
    content or motion stage's work (their logs or checkpoints in ``out``), which it would replace."""
    later = [name for name in ("content", "motion")
             if os.path.exists(os.path.join(out, "logs", f"{name}.jsonl"))
             or os.path.isdir(os.path.join(out, "checkpoints", name))]
    model = run_model_dir(out)
    if later and os.path.isdir(model):
        raise UsageError(f"{model!r} holds the {' and '.join(later)} stage's networks, which a stage-1 run from the "
                         f"config would replace with untrained ones: give stage 1 another --out (to fine-tune the "
                         f"decoder: --init {model} --freeze-encoder)")


def stage_files(out: str, stage: str) -> List[str]:
    """What a run of ``stage`` writes in the run folder ``out`` besides model/ (those that exist)."""
    paths = [os.path.join(out, "checkpoints", stage), os.path.join(out, "logs", f"{stage}.jsonl"),
             os.path.join(out, "logs", "tensorboard", stage), os.path.join(out, "samples", stage)]
    return [p for p in paths if os.path.exists(p)]


def check_new_run(args, out: str) -> List[str]:
    """Without --resume, a stage must not mix with a run of the same stage already in ``out``: a UsageError
    (one line) where ``out`` holds that stage's checkpoints or log, or, for the autoencoder stage built from
    the config, any model/ (which it would replace); with --overwrite, the paths to delete before the run
    writes (checked first, deleted by :func:`clear_old_run`)."""
    if args.resume:
        return []
    old = [p for p in stage_files(out, args.stage) if not p.endswith(os.sep + "samples" + os.sep + args.stage)]
    if args.stage == "autoencoder" and not args.init and os.path.isdir(run_model_dir(out)):
        old.append(run_model_dir(out))
    if not old:
        return []
    if not getattr(args, "overwrite", False):
        names = ", ".join(os.path.relpath(p, out) for p in old)
        raise UsageError(f"--out {out!r} already holds a run of the {args.stage} stage ({names}): continue it with --resume, "
                         "start it again with --overwrite, or choose another --out")
    return stage_files(out, args.stage) + [p for p in old if p == run_model_dir(out)]


def clear_old_run(paths: List[str], info: DistInfo) -> None:
    """--overwrite: delete the old run's ``paths`` (rank 0, the others wait), after every check passed."""
    if info.is_main:
        for path in paths:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    barrier(info)


def stage_model(args, stage: str, out: str) -> CMDModel:
    """The model bundle for a stage: stage 1 builds it from the config; stages 2a/2b load the previous
    stage's folder and put a freshly initialised (or --pretrained-unet) network in their slot. Every folder
    it reads is checked before any weights load (one line naming a missing or truncated file)."""
    init = args.init if stage == "autoencoder" else args.init or run_model_dir(out)
    if init == "default":  # the shipped model, as engine.run's --model default
        from engine.default_model import default_model_dir

        init = default_model_dir()
    if stage == "autoencoder" and not init:
        check_stage_one_out(out)
    if stage != "autoencoder" and not os.path.isfile(os.path.join(init, CONFIG_FILE)):
        raise UsageError(f"the {stage} stage needs the stage-1 model folder: {init!r} is not one (--init DIR)")
    if init:
        check_model_folder(init)
    if stage == "autoencoder" and not init and args.vae:
        find_vae(args.vae)
    if stage == "content" and args.pretrained_unet:
        find_content_unet(args.pretrained_unet)
    if stage == "autoencoder" and init:  # continue from a model folder (e.g. decoder fine-tuning)
        return CMDModel.from_pretrained(init)
    if stage == "autoencoder":
        cfg = _config(args.config or "default")
        torch.manual_seed(args.seed)
        model = CMDModel.from_config(cfg)
        if cfg.space == "latent":
            if not args.vae:
                raise UsageError(f"config {cfg.name!r} is in latent space: give the image VAE with --vae DIR")
            model.vae = load_vae(args.vae)
        _fill_clip_path(cfg, args)
        return model

    model = CMDModel.from_pretrained(init)
    cfg = _config(args.config) if args.config else model.config
    if _frozen_fields(cfg) != _frozen_fields(model.config):
        raise UsageError(f"config {cfg.name!r} does not match the autoencoder/clip geometry of {init!r}")
    model.config = cfg
    _fill_clip_path(cfg, args)
    torch.manual_seed(args.seed)
    if getattr(args, "finetune", False) or getattr(args, "lora", None) is not None:
        return _finetuned(model, stage, init, cfg)
    if stage == "content":
        if args.pretrained_unet:
            model.content_unet = load_content_unet(args.pretrained_unet)
        else:
            model.content_unet = build_content_unet(cfg.content_unet)
    else:
        model.motion_dit = build_motion_dit(cfg)
    return model


def _finetuned(model: CMDModel, stage: str, init: str, cfg: CMDConfig) -> CMDModel:
    """``model`` (loaded from ``init``) with its own network of ``stage`` kept for fine-tuning; a UsageError
    when the folder has none or ``cfg`` describes another architecture than the folder's."""
    name = NETWORK_OF[stage]
    if getattr(model, name) is None:
        raise UsageError(f"--finetune: the model folder {init!r} has no {name} to continue from")
    section = {"content": "content_unet", "motion": "motion_dit"}[stage]
    if cfg.to_dict()[section] != load_config(os.path.join(init, CONFIG_FILE)).to_dict()[section]:
        raise UsageError(f"--finetune: config {cfg.name!r} describes another {section} than the one in {init!r}")
    return model


def _fill_clip_path(cfg: CMDConfig, args) -> None:
    """A CLIP text encoder without a path (the sd21 config) is the one of the Stable Diffusion folder given
    with --pretrained-unet or --vae; recorded in the config, so the model folder tells the engine too."""
    if cfg.text_encoder.kind != "clip" or cfg.text_encoder.path:
        return
    for folder in (args.pretrained_unet, args.vae):
        if folder and os.path.isdir(os.path.join(folder, "text_encoder")):
            cfg.text_encoder.path = os.path.abspath(folder)
            return


def _config(name: str) -> CMDConfig:
    try:
        return load_config(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def write_model_folder(model: CMDModel, stage_name: str, ema: EMA, path: str) -> None:
    """Write the model folder with the EMA weights in the trained network's slot."""
    name = NETWORK_OF[stage_name]
    trained = getattr(model, name)
    setattr(model, name, ema.model)
    try:
        model.save_pretrained(path)
    finally:
        setattr(model, name, trained)


# ----------------------------------------------------------------------------------------------------
# Data


class Indexed(Dataset):
    """Adds the item's index and key (for the per-clip encoding cache); failing items (corrupt videos) become
    None. ``dataset``: one data set, or a list of data sets of the same clips at different sizes (one per
    size of the run, equal lengths); an item is then asked for as ``(index, k)``, clip ``index`` of the
    k-th set, and its key is that pair. A plain index means ``(index, 0)``."""

    def __init__(self, dataset):
        self.datasets = list(dataset) if isinstance(dataset, (list, tuple)) else [dataset]
        if len({len(d) for d in self.datasets}) != 1:
            raise ValueError(f"the per-size data sets differ in length: {[len(d) for d in self.datasets]}")
        self.dataset = self.datasets[0]

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)

    def __getitem__(self, key):
        index, k = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        item = self.datasets[k][index]
        if item is None:
            return None
        out = {"index": index, "key": (index, k), "caption": item["caption"]}
        for key in ("video", "latents"):
            if key in item:
                out[key] = item[key]
        return out


def collate_clips(items: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """Stack a batch; items that failed to load (None) are dropped and counted in ``skipped``."""
    good = [x for x in items if x is not None]
    batch: Dict[str, Any] = {"skipped": len(items) - len(good), "caption": [x["caption"] for x in good],
                             "index": torch.tensor([x["index"] for x in good], dtype=torch.long),
                             "key": [x.get("key", x["index"]) for x in good]}
    for key in ("video", "latents"):
        if good and key in good[0]:
            batch[key] = torch.stack([x[key] for x in good])
    return batch


def make_dataset(args, cfg: CMDConfig, model: CMDModel, info: DistInfo, size=None) -> Tuple[Dataset, Optional[Any]]:
    """(data set, counts): the synthetic set at ``size`` (a ClipSize; default the config's own; counts None),
    or a video folder (captions CSV or UCF-101)
    with its unusable videos left out and counted (:class:`trainer.data.videos.ClipCounts`; each rank
    probes its share, all ranks agree on the result); in latent mode with --latent-cache, the folder's
    videos are VAE-encoded once (each rank its share) and served as cached latents. Raises ValueError
    (exit 2) naming the folder and the counts when no video is usable."""
    if args.data == "synthetic":
        from trainer.data import SyntheticVideos

        size = size or cfg.default_size
        return SyntheticVideos(args.num_clips, size.frames, size.height, size.width, seed=args.seed), None
    if not os.path.isdir(args.data):
        raise UsageError(f"--data must be 'synthetic' or a folder, got {args.data!r}")
    from trainer.data.videos import open_video_folder

    size = size or cfg.default_size  # each video resized to cover the size, then cropped
    clips = open_video_folder(args.data, size.frames, size.height, size.width, seed=args.seed,
                              frame_stride=args.frame_stride, random_crop=args.random_crop)
    problems: Dict[int, Any] = {}
    for part in gather_objects([clips.check(range(info.rank, len(clips), info.world_size))], info):
        problems.update(part)
    clips, counts = clips.usable(problems)
    if cfg.space != "latent" or not args.latent_cache:
        return clips, counts
    from trainer.data.latents import LatentCache, LatentClips, cached_clips, fill_latent_cache

    cache = LatentCache(args.latent_cache, model.vae, cfg.height, cfg.width)
    fill_latent_cache(clips, cache, info.rank, info.world_size, progress=info.is_main and not args.no_progress)
    barrier(info)
    return LatentClips(cached_clips(clips, cache, counts), cache), counts


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of the data loader's own generator for (run seed, epoch, rank): the loader draws its
    workers' base seed from it, never from torch's global generator (which a resumed run must find as
    an uninterrupted run left it)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] % 2**63)


class Batches:
    """Endless batches for this rank, starting exactly where an uninterrupted run would after ``start``
    loader batches: epoch e is the DistributedSampler permutation of (seed, e) cut into batches of
    ``batch_size``; a resumed run skips the indices of the batches already taken (indices only, no
    decoding). Each epoch's DataLoader has its own generator (:func:`loader_seed`).

    ``taken``: loader batches handed out so far (saved in checkpoints: it differs from the step count
    when a batch had to be skipped because none of its clips loaded). ``generator``: the current epoch's
    loader generator (its state is saved with the others, for comparison). Raises :class:`UsageError` when
    the data set has fewer clips than one batch per process; ``about`` (the data's counts) completes that
    message.

    ``cycle``: the size of each batch (mixed-size training), a list of indices into the :class:`Indexed`
    set's per-size data sets: loader batch g (counted over the whole run) holds clips ``(i, cycle[g mod
    len(cycle)])``, so the sizes follow the run's batch count, across epochs and resumes alike. Default [0]."""

    def __init__(self, dataset: Dataset, batch_size: int, info: DistInfo, seed: int, start: int, workers: int,
                 about: str = "", cycle: Optional[List[int]] = None):
        self.dataset, self.batch_size, self.info, self.seed, self.workers = dataset, batch_size, info, seed, workers
        self.cycle = list(cycle) if cycle else [0]
        self.sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise UsageError(f"the data set has {len(dataset)} clips: fewer than one batch of {batch_size} "
                             f"per process ({info.world_size} processes){about}")
        self.taken = start
        self.generator: Optional[torch.Generator] = None
        self._it, self._epoch = None, -1

    def __iter__(self) -> "Batches":
        return self

    def _open_epoch(self, epoch: int) -> None:
        skip = self.taken - epoch * self.per_epoch
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        indices = list(self.sampler)[skip * self.batch_size: self.per_epoch * self.batch_size]
        bs, first = self.batch_size, epoch * self.per_epoch + skip  # the run-wide number of the first batch
        batches = [[(i, self.cycle[(first + j) % len(self.cycle)]) for i in indices[j * bs:(j + 1) * bs]]
                   for j in range(len(indices) // bs)]
        self.generator = torch.Generator().manual_seed(loader_seed(self.seed, epoch, self.info.rank))
        loader = DataLoader(self.dataset, batch_sampler=batches,
                            num_workers=self.workers, collate_fn=collate_clips, persistent_workers=False,
                            pin_memory=self.info.device.type == "cuda", generator=self.generator)
        self._it, self._epoch = iter(loader), epoch

    def __next__(self) -> Dict[str, Any]:
        epoch = self.taken // self.per_epoch
        if self._it is None or self._epoch != epoch:  # the epoch's loader yields exactly its remaining batches
            self._open_epoch(epoch)
        batch = next(self._it)
        self.taken += 1
        return batch


# ----------------------------------------------------------------------------------------------------
# Logging


class RunLog:
    """JSON lines (one object per event; rank 0 only) and TensorBoard scalars when tensorboard is installed."""

    def __init__(self, path: str, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(os.path.dirname(path), "tensorboard",
                                                 os.path.splitext(os.path.basename(path))[0]))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


# ----------------------------------------------------------------------------------------------------
# Training


def _rng_state(generator: torch.Generator, data: Batches, info: DistInfo) -> Dict[str, torch.Tensor]:
    """Every rank's random states, "<name>.<rank>" (gathered to all ranks; rank 0 writes them): the noise
    generator, the global ones (:func:`trainer.checkpoint.global_rng_states`) and the data loader's."""
    mine = {"generator": generator.get_state(), **ckpt.global_rng_states()}
    if data.generator is not None:
        mine["loader"] = data.generator.get_state()
    parts = gather_objects([mine], info)
    return {f"{name}.{rank}": value for rank, part in enumerate(parts) for name, value in part.items()}


def _set_rng_state(generator: torch.Generator, state: Dict[str, torch.Tensor], info: DistInfo) -> None:
    """This rank's states of :func:`_rng_state`; the loader's is not set (each epoch's loader generator
    is recreated from (seed, epoch, rank)). Checkpoints from before per-rank global states ("torch_cpu",
    "torch_cuda" without a rank) still load."""
    key = f"generator.{info.rank}"
    if key not in state or f"generator.{info.world_size}" in state:
        saved = sum(k.startswith("generator.") for k in state)
        raise UsageError(f"the checkpoint was written by {saved} processes, this run has {info.world_size}: "
                         "resume with the same number")
    generator.set_state(state[key])
    mine = {}
    for name, value in state.items():
        base, _, rank = name.rpartition(".")
        if rank == str(info.rank) and base not in ("generator", "loader"):
            mine[base] = value
    if not mine:  # an older checkpoint: rank 0's torch states only
        mine = {k: state[k] for k in ("torch_cpu", "torch_cuda") if k in state}
    ckpt.set_global_rng_states(mine)


def default_threads() -> int:
    """CPU threads per process: the cores shared among this node's processes, but 1 on a busy machine.
    On a shared CPU, OpenMP threads spin waiting for descheduled siblings: measured here under load 6-7 on
    2 cores, a 2-thread UNet forward took 10-25x the wall time of a 1-thread one."""
    cores = os.cpu_count() or 1
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        busy = os.getloadavg()[0] > cores / 2
    except OSError:  # no load average on this platform
        busy = False
    return 1 if busy else share


def lr_at(step: int, hp: Dict[str, Any]) -> float:
    """Linear warm-up over ``warmup_steps``, then constant."""
    warmup = int(hp.get("warmup_steps", 0))
    return hp["lr"] * min(1.0, (step + 1) / warmup) if warmup > 0 else hp["lr"]


@dataclass
class TrainResult:
    model_dir: str  # the model folder written (EMA weights of the trained network)
    network: torch.nn.Module  # the trained network (raw weights)
    ema: EMA
    step: int
    loss: Optional[float]  # this rank's loss at the last step run (None if no step ran)


@dataclass
class _Run:
    """One stage's training run, as the steps of :func:`train` build it up and use it."""

    args: Any
    info: DistInfo
    out: str  # the run folder (--out)
    model: CMDModel  # the bundle: the trained network in its slot, the frozen ones beside it
    hp: Dict[str, Any]  # :func:`hyperparams`
    stage: Any  # trainer.stages.Stage
    ema: EMA
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # this rank's noise draws
    start: int = 0  # the first step to run (resume: the checkpoint's)
    start_batches: int = 0  # loader batches this rank took before ``start``
    rng_saved: Optional[Dict[str, torch.Tensor]] = None  # the checkpoint's random states, set before step 1
    train_net: Optional[torch.nn.Module] = None  # the network, DDP-wrapped under torchrun
    dataset: Optional["Indexed"] = None
    sizes: Optional[List[str]] = None  # the run's sizes, each once, in order of first use
    counts: Any = None  # a video folder's ClipCounts (None for synthetic data)
    data: Optional["Batches"] = None
    log: Optional["RunLog"] = None
    bar: Any = None  # tqdm progress bar (rank 0, unless --no-progress)
    preview_batches: Optional[List[Dict[str, Any]]] = None  # the sample grids' clips, made at the first samples
    skipped: int = 0  # clips that failed to load so far
    lora: Optional[Tuple[Any, str]] = None  # --lora: (trainer.lora.LoraSpec, the base network's weight hash)
    adapter_bytes: int = 0  # --lora: the size of the adapter file last written

    @property
    def name(self) -> str:
        return self.args.stage

    @property
    def cfg(self) -> CMDConfig:
        return self.model.config

    @property
    def net(self) -> torch.nn.Module:
        return self.stage.network

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.out, "checkpoints", self.name)

    @property
    def model_dir(self) -> str:
        if self.lora is not None:
            from trainer.lora import adapter_path

            return adapter_path(self.out)
        return run_model_dir(self.out)

    @property
    def total(self) -> int:
        return int(self.hp["steps"])


def train(args, info: DistInfo) -> TrainResult:
    """Run one stage (the library entry point of the CLI; ``args`` from :func:`build_parser`), owning its run
    folder (:func:`engine.distributed.owned_output`) from the first check of what it holds to the end."""
    out = check_output(args.out, folder=True, flag="--out")  # before any work
    with owned_output(out, info, "--out"):
        return _train(args, info)


def _train(args, info: DistInfo) -> TrainResult:
    run = _setup(args, info)
    _resume(run)
    _build_data(run)
    _start_log(run)
    if run.rng_saved is not None:  # nothing may draw from the random states after this
        _set_rng_state(run.generator, run.rng_saved, info)
    sample_every = args.sample_every if args.sample_every is not None else int(run.hp["checkpoint_every"])
    smooth, value, clips, t_log = None, None, 0, time.perf_counter()
    for step in range(run.start, run.total):
        batch = _next_batch(run)
        loss, extra, lr, grad_norm = _train_step(run, step, batch)
        clips += len(batch["caption"]) * info.world_size
        done = step + 1
        value = loss.item()
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        if done % int(run.hp["log_every"]) == 0 or done == run.total or done == run.start + 1:
            t_log = _log_step(run, done, batch, loss, value, smooth, lr, grad_norm, clips, t_log, extra)
            clips = 0
        if run.bar is not None:
            run.bar.update(1)
        if done % int(run.hp["checkpoint_every"]) == 0 or done == run.total:
            _checkpoint(run, done)
        if info.is_main and sample_every > 0 and (done % sample_every == 0 or done == run.total):
            _samples(run, done)
    _finish(run)
    return TrainResult(run.model_dir, run.net, run.ema, run.total, value)


def _setup(args, info: DistInfo) -> _Run:
    """The run's model, hyper-parameters, stage, EMA, optimizer and noise generator (seeded from --seed)."""
    out = args.out
    random.seed(args.seed)  # torch's global generator is seeded where the networks are built (stage_model)
    np.random.seed(args.seed)
    check_flags(args)  # before stage_model reads any folder
    if args.stage == "autoencoder" and not args.init:
        check_stage_one_out(out)  # the later stages' work first: the more specific refusal
    old_run = check_new_run(args, out)
    model = stage_model(args, args.stage, out)
    cfg = model.config
    hp = hyperparams(cfg, args)
    clear_old_run(old_run, info)  # --overwrite: every check passed
    device = info.device
    if device.type == "cpu":
        torch.set_num_threads(args.threads or default_threads())

    text = None
    if args.stage != "autoencoder":
        from engine.models.text import TextEncoder

        text = CaptionEmbeddings(lambda: TextEncoder.from_config(cfg.text_encoder), device=device)
        if args.text_cache:
            text.load(args.text_cache)
    stage = make_stage(args.stage, model, hp, device, text, amp=hp["precision"] == "bf16",
                       cache_encodings=args.data == "synthetic" and not args.no_encoding_cache)
    lora = _inject_lora(args, stage)
    net = stage.network
    ema = EMA(net, float(hp["ema_decay"]))
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=hp["lr"], betas=hp["betas"],
                                  weight_decay=float(hp["weight_decay"]))
    generator = torch.Generator().manual_seed(args.seed + 100_003 * info.rank)  # per-rank draws
    return _Run(args, info, out, model, hp, stage, ema, optimizer, generator, lora=lora)


def _inject_lora(args, stage) -> Optional[Tuple[Any, str]]:
    """--lora: peft LoRA layers in the stage's (frozen) network; (spec, the base weights' hash) or None."""
    if args.lora is None:
        return None
    from trainer.lora import lora_spec, prepare_lora

    try:
        spec = lora_spec(stage.network_name, args.lora, args.lora_alpha, args.lora_targets)
        return spec, prepare_lora(stage.network, spec)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _resume(run: _Run) -> None:
    """--resume: the newest checkpoint's weights, optimizer and EMA, and where the run stood (step, data
    position, random states); notes on stderr where this run's batch size, seed or sizes differ from it."""
    args, info, hp = run.args, run.info, run.hp
    if not args.resume:
        return
    path = ckpt.latest_checkpoint(run.ckpt_root)
    if path is None:
        if info.is_main:
            print(f"note: no checkpoint under {run.ckpt_root}: starting from step 0", file=sys.stderr)
        return
    state = ckpt.load_checkpoint(path, run.optimizer)
    saved = state["state"]
    if saved.get("stage") != run.name:
        raise UsageError(f"checkpoint {path!r} is of stage {saved.get('stage')!r}, not {run.name!r}")
    if (saved.get("batch_size"), saved.get("seed")) != (int(hp["batch_size"]), args.seed) and info.is_main:
        # The data position is recomputed from the step, batch size and seed: a change still trains,
        # but no longer repeats what the uninterrupted run would have seen.
        print(f"note: resuming with batch size {hp['batch_size']} / seed {args.seed} (checkpoint: "
              f"{saved.get('batch_size')} / {saved.get('seed')}): the data order differs", file=sys.stderr)
    saved_sizes = saved.get("sizes", [str(run.cfg.default_size)])  # older checkpoints: the own size
    if list(saved_sizes) != hp["sizes"] and info.is_main:
        print(f"note: resuming with sizes {','.join(hp['sizes'])} (checkpoint: {','.join(saved_sizes)}): "
              "the batches' sizes differ from the uninterrupted run's", file=sys.stderr)
    for name in ("model", "ema"):  # integer, misshapen or NaN weights: one line naming the tensor, not a cast
        check_tensors(state[name].items(), run.net.state_dict(), f"checkpoint {path!r}: {name}.safetensors")
    run.net.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"], state["state"]["ema_updates"])
    run.rng_saved = state["rng"]  # set just before the first step: nothing may draw after it
    run.start = int(saved["step"])
    # Loader batches taken (per rank): more than the steps when a batch had no loadable clip.
    run.start_batches = int((saved.get("data_batches") or [run.start] * info.world_size)[info.rank])


def _build_data(run: _Run) -> None:
    """The DDP-wrapped network and this rank's batches, from where the run stands (one data set per size of
    the run, each size's clips the same scenes); a note on stderr counting a video folder's unusable videos."""
    from engine.geometry import ClipSize

    args, info, cfg, hp = run.args, run.info, run.cfg, run.hp
    run.train_net = run.net
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = info.device
        run.train_net = DDP(run.net, device_ids=[device.index] if device.type == "cuda" else None)
    run.sizes = list(dict.fromkeys(hp["sizes"]))
    if run.sizes == [str(cfg.default_size)]:
        dataset, run.counts = make_dataset(args, cfg, run.model, info)
        run.dataset = Indexed(dataset)
    else:  # the same clips at each size (synthetic: rendered at it; videos: resized to it)
        run.dataset = Indexed([make_dataset(args, cfg, run.model, info, ClipSize.parse(s))[0] for s in run.sizes])
    cycle = [run.sizes.index(s) for s in hp["sizes"]]
    workers = args.workers if args.workers is not None else (0 if args.data == "synthetic" else 2)
    counts = run.counts
    about = f"; {counts.root}: {counts.summary()}" if counts is not None else ""
    run.data = Batches(run.dataset, int(hp["batch_size"]), info, args.seed, run.start_batches, workers, about, cycle)
    if counts is not None and info.is_main and counts.usable < counts.found:
        print(f"note: {counts.root}: {counts.summary()}", file=sys.stderr)


def _start_log(run: _Run) -> None:
    """Open the log with its start record, and the progress bar."""
    counts = run.counts
    run.log = RunLog(os.path.join(run.out, "logs", f"{run.name}.jsonl"), run.info.is_main)
    n_params = sum(p.numel() for p in run.net.parameters())
    run.log.write({"event": "start", "stage": run.name, "config": run.cfg.name, "start_step": run.start,
                   "params": n_params, "world_size": run.info.world_size, "threads": torch.get_num_threads(),
                   "hparams": {k: v for k, v in run.hp.items()}, "device": str(run.info.device),
                   **({"data": counts.to_dict()} if counts is not None else {})})
    if run.info.is_main and not run.args.no_progress:
        from tqdm import tqdm

        run.bar = tqdm(total=run.total, initial=run.start, desc=run.name, unit="step", dynamic_ncols=True)


def _next_batch(run: _Run) -> Dict[str, Any]:
    """The next batch with at least one clip (batches whose clips all failed to load are passed over);
    raises ValueError when a whole epoch's worth of batches in a row loaded nothing."""
    data = run.data
    batch = next(data)
    run.skipped += batch["skipped"]
    empty = 0
    while batch["caption"] == []:  # every clip of the batch failed to load: take the next batch
        empty += 1
        if empty >= 2 * data.per_epoch:  # so long a run of empty batches holds a whole epoch: nothing loads
            where = f" in {run.counts.root!r}" if run.counts is not None else ""
            raise ValueError(f"no clip loaded{where} in the last {empty} batches of {data.batch_size} "
                             f"({run.skipped} clips skipped so far)")
        batch = next(data)
        run.skipped += batch["skipped"]
    return batch


def _train_step(run: _Run, step: int, batch: Dict[str, Any]):
    """One optimizer step (0-based ``step``) on ``batch``, then the EMA update: (loss, the stage's extra log
    values, learning rate, gradient norm before clipping). Raises RuntimeError on a non-finite loss."""
    lr = lr_at(step, run.hp)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with torch.no_grad():
        inputs = run.stage.prepare(batch)
    with run.stage.autocast():
        loss, extra = run.stage.loss(run.train_net, inputs, run.generator)
    if not torch.isfinite(loss):
        raise RuntimeError(f"step {step}: the loss is {loss.item()}; lower the learning rate")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.net.parameters(), float(run.hp["grad_clip"]))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.update(run.net)
    return loss, extra, lr, grad_norm


def _log_step(run: _Run, done: int, batch, loss: torch.Tensor, value: float, smooth: float, lr: float,
              grad_norm, clips: int, t_log: float, extra: Dict[str, Any]) -> float:
    """The log line of step ``done``, ``clips`` trained since ``t_log`` (time.perf_counter) giving the
    throughput; returns the time of this line. The loss is averaged over the ranks: a collective, every
    rank calls it."""
    from engine.geometry import ClipSize

    mean_loss = mean_across_ranks(loss.detach(), run.info).item()
    now = time.perf_counter()
    record = {"step": done, "loss": mean_loss, "rank0_loss": value, "lr": lr,
              "grad_norm": float(grad_norm), "clips_per_s": clips / max(now - t_log, 1e-9),
              "batch_clips": len(batch["caption"]), "skipped_clips": run.skipped, "time": time.time(),
              "size": str(ClipSize(*_clip_size(batch, run.cfg.vae_scale))),
              **extra}
    run.log.write(record)
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{smooth:.4f}", clips_s=f"{record['clips_per_s']:.1f}")
    return now


def _checkpoint(run: _Run, done: int) -> None:
    """The checkpoint of step ``done`` and the model folder (rank 0 writes; every rank takes part)."""
    info, hp = run.info, run.hp
    rng = _rng_state(run.generator, run.data, info)  # collectives: every rank takes part
    taken = gather_objects([run.data.taken], info)
    if info.is_main:
        path = ckpt.save_checkpoint(
            run.ckpt_root, done, run.net.state_dict(), run.ema.state_dict(), run.optimizer, rng,
            {"stage": run.name, "ema_updates": run.ema.num_updates, "config": run.cfg.name, "seed": run.args.seed,
             "batch_size": int(hp["batch_size"]), "world_size": info.world_size, "data_batches": taken,
             "sizes": hp["sizes"]},
            keep=run.args.keep)
        written = _write_result(run, done)
        run.log.write({"event": "checkpoint", "step": done, "path": path, "model": written})
    barrier(info)


def _write_result(run: _Run, done: int) -> str:
    """The run's result from the EMA weights: the model folder, or with --lora the adapter file (the --init
    folder is never written). Returns its path."""
    if run.lora is None:
        write_model_folder(run.model, run.name, run.ema, run.model_dir)
        return run.model_dir
    from trainer.lora import adapter_path, write_adapter

    spec, base_hash = run.lora
    path = adapter_path(run.out)
    run.adapter_bytes = write_adapter(path, run.stage.network_name, run.ema.model, spec, base_hash,
                                      os.path.abspath(run.args.data), done)
    return path


def _samples(run: _Run, done: int) -> None:
    """Sample videos of step ``done`` from the EMA weights, one grid per size of the run (rank 0)."""
    if run.preview_batches is None:  # the first clips, at each size of the run
        n = min(run.args.num_samples, len(run.dataset))
        run.preview_batches = [collate_clips([run.dataset[(i, k)] for i in range(n)]) for k in range(len(run.sizes))]
    for k, preview_batch in enumerate(run.preview_batches):
        if not preview_batch["caption"]:  # (none when the first clips all failed to decode)
            continue
        name = f"step-{done:08d}" + (f"-{run.sizes[k]}" if len(run.sizes) > 1 else "")
        with ckpt.preserved_rng():  # samples draw nothing from the training's random states
            write_samples(run.stage, run.ema, preview_batch, os.path.join(run.out, "samples", run.name, name),
                          run.cfg.sampling.fps, run.log, done)


def _finish(run: _Run) -> None:
    """Close the progress bar, and the log with its done record."""
    if run.bar is not None:
        run.bar.close()
    counts = run.counts
    run.log.write({"event": "done", "step": run.total, "model": run.model_dir, "skipped_clips": run.skipped,
                   **({"data": counts.to_dict()} if counts is not None else {})})
    run.log.close()


def _clip_size(batch: Dict[str, Any], vae_scale: int) -> Tuple[int, int, int]:
    """(frames, height, width) in pixels of a batch's clips: its videos' (B, L, 3, H, W), or its cached
    VAE latents' (B, L, c, h, w) times the VAE's downsampling."""
    if "video" in batch:
        _, frames, _, height, width = batch["video"].shape
        return frames, height, width
    _, frames, _, height, width = batch["latents"].shape
    return frames, height * vae_scale, width * vae_scale


def write_samples(stage, ema: EMA, batch, path: str, fps: int, log: RunLog, step: int) -> None:
    from trainer.preview import preview, write_frames

    net = ema.model
    t0 = time.perf_counter()
    with torch.no_grad():
        frames = preview(stage, net, batch)
    written = write_frames(frames, path, fps)
    log.write({"event": "samples", "step": step, "path": written, "seconds": time.perf_counter() - t0})


def main(argv: Optional[List[str]] = None) -> int:
    def body(joined) -> int:
        args = build_parser().parse_args(argv)
        info = joined(init_distributed(args.device))
        result = train(args, info)
        if info.is_main and args.lora is not None:
            print(f"adapter: {result.model_dir} ({os.path.getsize(result.model_dir) / 1024:.1f} KiB)")
        elif info.is_main:
            print(f"model folder: {result.model_dir}")
        return 0

    return run_ranks(body)  # bad input: one line, exit 2; Ctrl-C: exit 130; the rank leaves its group


if __name__ == "__main__":
    sys.exit(main())
