"""python -m engine.calibrate_cache --model DIR: measure a model's per-step output change and write its
static reuse schedules (:mod:`engine.cache`) into the model folder's config.

    python -m engine.calibrate_cache --model engine/weights/default
    python -m engine.calibrate_cache --model DIR --prompts-file prompts.txt --steps 50 --motion-steps 50 --threshold 0.1
    python -m engine.calibrate_cache --model DIR --sizes 16x64x64 --dry-run

The model samples the calibration prompts without any cache, CFG on every step, with its default
guidance, at every clip size it serves (the config's ``sizes``; ``--sizes`` picks some of them): a
schedule is fixed per (scheduler, steps), whatever the size, so it is measured at each. After each step
the guided output of each network (the content UNet's and the motion DiT's, what a reuse step would
take) is compared with the previous step's: at one size, ``change[i - 1]`` is the mean over videos of
``mean |out_i - out_{i-1}| / mean |out_{i-1}|``; the schedule's ``change`` is the elementwise maximum
over the sizes (a step is reused only where that is safe at every size). A static schedule then reuses
a step while the change accumulated since the last full evaluation stays below ``--threshold``
(default: the model's current one, else 0.15; first and last steps always run;
:func:`engine.cache.schedule_from_change`). The measured change is stored too (the maximum under
``change``, each size's under ``change_by_size``), so ``pipe(cache="static", cache_threshold=T)``
derives other schedules without calibrating again.

Written into ``DIR/cmd_config.json`` under ``sampling.cache`` (atomically; entries for other
scheduler/step counts are kept): a free-form ``sampling`` entry, so older code loads the folder as
before and the export carries it in its manifest. ``--dry-run`` prints and writes nothing.

Prompts: ``--prompts-file`` (one a line), else those of the model's last calibration, else
:data:`DEFAULT_PROMPTS` (captions of the shipped default model's domain, training attribute
combinations only, so that evaluations on held-out combinations stay held out).
"""

import datetime
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from engine.atomic import atomic_path, output_lock
from engine.backends.base import Backend
from engine.cache import (CONFIG_KEY, DEFAULT_DYNAMIC_THRESHOLD, DEFAULT_REUSE, REUSE_MODES, cache_data,
                          check_threshold, guide, relative_change, schedule_from_change, schedule_key)
from engine.cli import Int, Number, Parser, Seed, check_seed, read_prompts, run_main
from engine.geometry import ClipSize, check_served, format_sizes
from engine.text_files import read_json

DEFAULT_THRESHOLD = 0.15
DEFAULT_PROMPTS = (
    "a red circle moving right",
    "a green square moving up",
    "a blue triangle moving left",
    "a yellow circle moving down",
    "a white square moving right",
    "an orange triangle moving up",
    "a purple square moving left",
    "a red square moving down",
    "the crimson ball is drifting rightward",
    "an emerald block travelling up",
    "an azure wedge sliding to the left",
    "a golden disc falling",
    "a snowy box going rightward",
    "an amber triangle rising",
    "a violet block sliding to the left",
    "a scarlet box going downward",
)


class _Recorder(Backend):
    """Wraps a backend and keeps a float32 copy of every denoiser output, in call order."""

    def __init__(self, inner: Backend):
        self.inner, self.model, self.device, self.dtype = inner, inner.model, inner.device, inner.dtype
        self.device_scheduler = inner.device_scheduler
        self.outputs: Dict[str, List[torch.Tensor]] = {"unet": [], "dit": []}

    def unet_step(self, sample, timestep, states):
        out = self.inner.unet_step(sample, timestep, states)
        self.outputs["unet"].append(out.float().clone())
        return out

    def dit_step(self, motion, timestep, content, text):
        out = self.inner.dit_step(motion, timestep, content, text)
        self.outputs["dit"].append(out.float().clone())
        return out

    def decode(self, content, motion):
        return self.inner.decode(content, motion)


def measure_change(pipe, prompts: Sequence[str], seed: int = 0, scheduler: Optional[str] = None,
                   steps: Optional[int] = None, motion_steps: Optional[int] = None,
                   batch_size: int = 8, size=None) -> Dict[str, List[float]]:
    """Per loop ("content", "motion"), the mean relative L1 change of the guided output between
    consecutive steps (steps - 1 values), sampling ``prompts`` without cache (prompt k seeded
    ``seed + k``), CFG on every step, the model's default guidance, at clip ``size`` (default: the
    model's own; a ClipSize or "FxHxW"; a ValueError if the model does not serve it)."""
    size = check_served(pipe.config, pipe.config.default_size if size is None else ClipSize.coerce(size))
    dims = dict(num_frames=size.frames, height=size.height, width=size.width)
    req = pipe.check_inputs(num_inference_steps=steps, motion_steps=motion_steps, scheduler=scheduler, **dims)
    inner = pipe.backend
    recorder = _Recorder(inner)
    sums = {"content": np.zeros(req.steps - 1), "motion": np.zeros(req.motion_steps - 1)}
    videos = 0
    try:
        pipe.set_backend(recorder)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            for key in recorder.outputs:
                recorder.outputs[key].clear()
            pipe(chunk, generator=seed + start, num_inference_steps=req.steps, motion_steps=req.motion_steps,
                 scheduler=req.scheduler, output_type="latent", progress=False, **dims)
            for stage, key, guidance in (("content", "unet", req.guidance), ("motion", "dit", req.motion_guidance)):
                outs = [guide(o, len(chunk), guidance > 1.0, guidance) for o in recorder.outputs[key]]
                for i in range(1, len(outs)):
                    sums[stage][i - 1] += float(relative_change(outs[i], outs[i - 1]).sum())
            videos += len(chunk)
    finally:
        pipe.set_backend(inner)
    return {stage: [round(float(v) / videos, 6) for v in s] for stage, s in sums.items()}


def max_change(by_size: Dict[str, Dict[str, List[float]]]) -> Dict[str, List[float]]:
    """Per loop, the elementwise maximum of :func:`measure_change`'s results at several sizes
    (``{size: {"content": [...], "motion": [...]}}``): what a schedule for all of them is derived from."""
    changes = list(by_size.values())
    return {stage: [max(values) for values in zip(*(c[stage] for c in changes))] for stage in changes[0]}


def calibration_sizes(config, sizes: Optional[Sequence] = None) -> List[ClipSize]:
    """The sizes to calibrate at: ``sizes`` (ClipSizes or "FxHxW" strings; a comma-separated string too;
    repeats dropped), each one the model serves, else a one-line ValueError naming it; None: every size
    the model serves (``config.served_sizes``)."""
    if sizes is None:
        return config.served_sizes
    items = sizes.split(",") if isinstance(sizes, str) else list(sizes)
    if not items:
        raise ValueError("sizes: give at least one clip size FxHxW the model serves")
    return list(dict.fromkeys(check_served(config, ClipSize.coerce(s.strip() if isinstance(s, str) else s))
                              for s in items))


def calibrate(pipe, prompts: Sequence[str], threshold: Optional[float] = None, reuse: Optional[str] = None,
              dynamic_threshold: Optional[float] = None, seed: int = 0, scheduler: Optional[str] = None,
              steps: Optional[int] = None, motion_steps: Optional[int] = None, batch_size: int = 8,
              sizes: Optional[Sequence] = None) -> Dict:
    """The model config's new ``sampling["cache"]`` data: the old entries plus this (scheduler, steps)'s
    measured change at each of ``sizes`` (:func:`calibration_sizes`; default: every size the model
    serves) under ``change_by_size``, their elementwise maximum under ``change`` and the schedules derived
    from it at ``threshold`` (None: the model's current one, else :data:`DEFAULT_THRESHOLD`). Changes
    nothing on disk (see :func:`write_cache_data`). ValueError for a bad value, before any sampling."""
    sizes = calibration_sizes(pipe.config, sizes)
    old = json.loads(json.dumps(cache_data(pipe.config) or {}))  # a copy: the loaded config stays as it is
    threshold = check_threshold(old.get("threshold", DEFAULT_THRESHOLD) if threshold is None else threshold)
    reuse = reuse or old.get("reuse", DEFAULT_REUSE)
    if reuse not in REUSE_MODES:
        raise ValueError(f"--reuse must be one of {', '.join(REUSE_MODES)}, got {reuse!r}")
    if dynamic_threshold is None:
        dynamic_threshold = old.get("dynamic_threshold", DEFAULT_DYNAMIC_THRESHOLD)
    dynamic_threshold = check_threshold(dynamic_threshold)
    if old.get("threshold") not in (None, threshold):
        # One threshold for every stored schedule: re-derive the kept ones at the new threshold.
        for stage, entries in old.get("change", {}).items():
            for key, change in entries.items():
                old.setdefault("schedules", {}).setdefault(stage, {})[key] = schedule_from_change(change, threshold)
    req = pipe.check_inputs(num_inference_steps=steps, motion_steps=motion_steps, scheduler=scheduler)
    by_size = {str(size): measure_change(pipe, prompts, seed, req.scheduler, req.steps, req.motion_steps, batch_size,
                                         size) for size in sizes}
    change = max_change(by_size)
    data = dict(old, reuse=reuse, threshold=threshold, dynamic_threshold=dynamic_threshold)
    for entry in ("schedules", "change", "change_by_size"):
        data[entry] = {k: dict(v) for k, v in old.get(entry, {}).items()}
    for stage, n in (("content", req.steps), ("motion", req.motion_steps)):
        key = schedule_key(req.scheduler, n)
        data["change"].setdefault(stage, {})[key] = change[stage]
        data["change_by_size"].setdefault(stage, {})[key] = {s: c[stage] for s, c in by_size.items()}
        data["schedules"].setdefault(stage, {})[key] = schedule_from_change(change[stage], threshold)
    data["calibration"] = {"prompts": list(prompts), "sizes": list(by_size), "seed": seed, "guidance": req.guidance,
                           "motion_guidance": req.motion_guidance,
                           "date": datetime.date.today().isoformat(),
                           "measure": "mean relative L1 change of the guided output between consecutive steps"}
    return data


def write_cache_data(model_dir: str, data: Dict) -> str:
    """Replace ``sampling["cache"]`` in ``model_dir/cmd_config.json`` (atomically, holding the folder's
    one-writer lock: another writer refuses, OutputBusy); returns the path."""
    with output_lock(model_dir, "--model"):
        return _write_cache_data(model_dir, data)


def _write_cache_data(model_dir: str, data: Dict) -> str:
    from engine.default_model import CONFIG_FILE

    path = os.path.join(model_dir, CONFIG_FILE)
    config = read_json(path, "model config")
    # The measured change lists go on one line each (placeholders, then their compact JSON): readable.
    data = json.loads(json.dumps(data))
    lists = [(entries, key) for entries in data.get("change", {}).values() for key in entries]
    lists += [(by_size, size) for entries in data.get("change_by_size", {}).values()
              for by_size in entries.values() for size in by_size]
    compact = {}
    for parent, key in lists:
        mark = f"@change-{len(compact)}@"
        compact[f'"{mark}"'] = json.dumps(parent[key])
        parent[key] = mark
    config.setdefault("sampling", {})[CONFIG_KEY] = data
    text = json.dumps(config, indent=2)
    for mark, value in compact.items():
        text = text.replace(mark, value)
    with atomic_path(path, suffix=".json") as tmp, open(tmp, "w") as f:
        f.write(text + "\n")
    return path


def _prompts(args, config) -> List[str]:
    if args.prompts_file:
        return [p for _, p in read_prompts(args.prompts_file)]
    previous = ((cache_data(config) or {}).get("calibration") or {}).get("prompts")
    return list(previous) if previous else list(DEFAULT_PROMPTS)


def main(argv=None) -> int:
    p = Parser(prog="python -m engine.calibrate_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a CMD model folder ('default': the shipped one)")
    p.add_argument("--prompts-file", help="calibration prompts, one a line (default: the last calibration's, "
                   "else built-in ones)")
    p.add_argument("--threshold", type=Number(low=0.0), default=None, help="accumulated relative change that ends a reuse "
                   f"run (default: the model's current one, else {DEFAULT_THRESHOLD})")
    p.add_argument("--reuse", choices=REUSE_MODES, help=f"what reuse steps take (default: kept, else {DEFAULT_REUSE})")
    p.add_argument("--dynamic-threshold", type=Number(low=0.0), help="cache='dynamic''s default threshold to store "
                   f"(default: kept, else {DEFAULT_DYNAMIC_THRESHOLD})")
    p.add_argument("--scheduler", help="ddim or dpm (default: the config's)")
    p.add_argument("--steps", type=Int(), help="content steps (default: the config's)")
    p.add_argument("--motion-steps", type=Int(), help="motion steps (default: the config's)")
    p.add_argument("--sizes", help="comma-separated clip sizes FxHxW to measure at, each one the model serves "
                   "(default: every size it serves)")
    p.add_argument("--seed", type=Seed, default=0, help="prompt k is seeded --seed + k")
    p.add_argument("--batch-size", type=Int(), default=8)
    p.add_argument("--dry-run", action="store_true", help="print the schedules, write nothing")
    return run_main(lambda: _calibrate(p.parse_args(argv)), interrupted="interrupted; nothing was written")


def _calibrate(args) -> int:
    from engine.default_model import resolve_model

    spec = resolve_model(args.model)
    if spec.is_random:
        raise ValueError("calibrate a model folder: random weights have no folder to write the schedule into")
    config = spec.load_config()
    if args.threshold is not None:
        check_threshold(args.threshold)
    if args.dynamic_threshold is not None:
        check_threshold(args.dynamic_threshold)
    from engine.request import check_request

    check_request(config, num_inference_steps=args.steps, motion_steps=args.motion_steps, scheduler=args.scheduler)
    sizes = calibration_sizes(config, args.sizes)
    if not os.access(os.path.join(spec.path, "cmd_config.json"), os.W_OK) and not args.dry_run:
        raise ValueError(f"cannot write {os.path.join(spec.path, 'cmd_config.json')!r}")
    prompts = _prompts(args, config)
    check_seed("--seed", args.seed, len(prompts))  # prompt k is seeded --seed + k

    from engine.pipeline import CMDPipeline

    pipe = CMDPipeline.from_pretrained(spec)
    data = calibrate(pipe, prompts, args.threshold, args.reuse, args.dynamic_threshold, args.seed,
                     args.scheduler, args.steps, args.motion_steps, args.batch_size, sizes)
    req = pipe.check_inputs(num_inference_steps=args.steps, motion_steps=args.motion_steps, scheduler=args.scheduler)
    print(f"measured at {format_sizes(sizes)} (frames x height x width)")
    for stage, n in (("content", req.steps), ("motion", req.motion_steps)):
        key = schedule_key(req.scheduler, n)
        schedule = data["schedules"][stage][key]
        print(f"{stage} {key}: {schedule}  ({schedule.count('F')} of {n} steps run the network)")
    if not args.dry_run:
        print(f"wrote sampling.{CONFIG_KEY} to {write_cache_data(spec.path, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
