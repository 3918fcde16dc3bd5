"""Fewer denoiser evaluations: step caching and guidance intervals for the two denoising loops.

Three knobs, all chosen per call (``pipe(..., cache=, cache_threshold=, guidance_interval=)``):

- ``cache="static"``: a per-model **reuse schedule** says, for each step of a (scheduler, step count),
  whether the network runs (``F``) or the step reuses the last computed output (``R``), or extrapolates
  it linearly from the last two computed outputs, as the schedule's ``reuse`` field says. Schedules are
  config data (``sampling["cache"]`` of the model's ``cmd_config.json``), written by
  ``python -m engine.calibrate_cache --model DIR`` from the measured per-step change of each network's
  guided output on calibration prompts. The schedule is fixed before the loop starts, so the Python loop
  knows at every step which network (or CUDA graph, ONNX session, TensorRT plan) to call: no host sync,
  any backend. ``cache_threshold`` derives another schedule from the same measurements (larger: fewer
  evaluations); 0 computes every step.
- ``cache="dynamic"``: the First-Block-Cache idea (ParaAttention, cache-dit; TeaCache's accumulated
  indicator is the same family): every step runs the network's first block (the UNet's ``conv_in`` and
  first down block; the DiT's embeddings and first block); a video whose first-block output (DiT: that
  block's residual) changed less than ``cache_threshold`` (relative L1) since its last full evaluation
  skips the rest: the UNet reuses (or extrapolates) its last output, the DiT adds its last cached
  residual of the remaining blocks to the fresh first-block output and runs the output head. Decided per
  video on the host at each step (a sync), so only backends that run the networks in pieces support it
  (eager, compile); a batch gives each video the same decisions it would get alone.
- ``guidance_interval=(start, end)``: classifier-free guidance only on the steps whose start lies in
  the fraction [start, end) of the schedule (step i of n starts at i / n); elsewhere the network runs
  the conditional half alone (a batch of B instead of 2B). Kynkaanniemi et al., "Applying Guidance in a
  Limited Interval Improves Sample and Distribution Quality in Diffusion Models" (NeurIPS 2024).

In every mode the first and the last step of a calibrated or dynamic schedule run the full network.

Config data (``sampling["cache"]``; older code ignores it, being a free-form ``sampling`` entry)::

    {"reuse": "extrapolate",            # or "reuse": what a skipped step takes (static; dynamic UNet)
     "threshold": 0.15,                 # the threshold the schedules below were derived at
     "dynamic_threshold": 0.1,          # cache="dynamic"'s default threshold
     "schedules": {"content": {"ddim/25": "FFRRF...F"}, "motion": {...}},   # one letter a step
     "change": {"content": {"ddim/25": [0.02, ...]}, "motion": {...}},      # steps - 1 values: the largest
     "change_by_size": {"content": {"ddim/25": {"16x32x32": [0.02, ...], ...}}, ...},   # over these sizes
     "calibration": {...}}              # how it was measured (prompts, sizes, seed, command)
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.cli import check_number

CACHE_MODES = ("static", "dynamic")
REUSE_MODES = ("reuse", "extrapolate")
CONFIG_KEY = "cache"  # the entry of config.sampling
FULL, REUSE = "F", "R"
DEFAULT_REUSE = "extrapolate"
DEFAULT_DYNAMIC_THRESHOLD = 0.1
CALIBRATE_HINT = "python -m engine.calibrate_cache --model DIR"
# UNet config keys the dynamic mode's split forward does not implement (extra embeddings or inputs).
_UNSPLITTABLE_UNET_KEYS = ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type",
                           "num_class_embeds", "attention_type")


def schedule_key(scheduler: str, steps: int) -> str:
    """The key of a schedule in the config data: ``"ddim/25"``."""
    return f"{scheduler}/{int(steps)}"


# ------------------------------------------------------------------------------------------ checks


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_threshold(value) -> float:
    """A cache threshold: a finite number >= 0 (a relative L1 change), else a one-line ValueError."""
    return check_number("cache_threshold", value, low=0.0)


def check_guidance_interval(value) -> Tuple[float, float]:
    """``(start, end)`` with 0 <= start <= end <= 1 (fractions of the schedule), else a ValueError.
    ``start == end`` is an empty interval: no step runs the unconditional half."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"guidance_interval must be a pair (start, end) of fractions in [0, 1], got {value!r}")
    start, end = (_number("guidance_interval", v) for v in value)
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"guidance_interval must lie in [0, 1], got ({start:g}, {end:g})")
    if start > end:
        raise ValueError(f"guidance_interval is reversed: start {start:g} > end {end:g}")
    return start, end


def guidance_steps(interval: Optional[Tuple[float, float]], steps: int) -> Tuple[bool, ...]:
    """Per step, whether CFG runs: step i (starting at fraction i / steps) lies in [start, end).
    ``end == 1`` includes the last step; ``None`` is every step."""
    if interval is None:
        return (True,) * steps
    start, end = interval
    return tuple(start <= i / steps < end or (end >= 1.0 and i / steps >= start) for i in range(steps))


def schedule_from_change(change: Sequence[float], threshold: float) -> str:
    """A static schedule from the measured relative change of a loop's output between consecutive steps
    (``change[i - 1]`` between steps i - 1 and i): a step reuses while the change accumulated since the
    last full evaluation stays below ``threshold`` (TeaCache's accumulation rule); the first and the last
    step always run. Threshold 0 runs every step."""
    steps = len(change) + 1
    letters, accumulated = [FULL], 0.0
    for i in range(1, steps):
        accumulated += float(change[i - 1])
        if i == steps - 1 or accumulated >= threshold:
            letters.append(FULL)
            accumulated = 0.0
        else:
            letters.append(REUSE)
    return "".join(letters)


def check_schedule(text, steps: int, where: str) -> Tuple[bool, ...]:
    """A schedule string -> per-step "run the network" flags; a ValueError if it does not fit ``steps``."""
    if not isinstance(text, str) or not text or set(text) - {FULL, REUSE}:
        raise ValueError(f"{where}: a schedule is a string of {FULL} (full network) and {REUSE} (reuse), got {text!r}")
    if len(text) != steps:
        raise ValueError(f"{where}: the schedule has {len(text)} steps, the loop {steps}")
    if text[0] != FULL:
        raise ValueError(f"{where}: the first step must run the network ({FULL}): there is nothing to reuse yet")
    return tuple(c == FULL for c in text)


def unet_supports_split(unet_config: Mapping[str, Any]) -> Optional[str]:
    """None if the dynamic mode can run this UNet (config kwargs) in pieces, else why not."""
    bad = [k for k in _UNSPLITTABLE_UNET_KEYS if unet_config.get(k) not in (None, "default")]
    if unet_config.get("center_input_sample"):
        bad.append("center_input_sample")
    if bad:
        return f"the content UNet uses {', '.join(bad)}, which cache='dynamic' does not split"
    return None


def cache_data(config) -> Optional[Dict[str, Any]]:
    """The config's ``sampling["cache"]`` (validated in shape), or None."""
    data = config.sampling.get(CONFIG_KEY)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"config {config.name!r}: sampling.{CONFIG_KEY} must be an object, got {type(data).__name__}")
    reuse = data.get("reuse", DEFAULT_REUSE)
    if reuse not in REUSE_MODES:
        raise ValueError(f"config {config.name!r}: sampling.{CONFIG_KEY}.reuse must be one of {REUSE_MODES}, "
                         f"got {reuse!r}")
    return data


# ------------------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class StagePlan:
    """What one denoising loop does at each step.

    ``compute[i]``: the full network runs (False: the step reuses, see ``reuse``); ``cfg[i]``: the
    CFG batch (conditional + unconditional) runs, else the conditional half alone (only where the
    call's guidance is > 1); ``reuse``: "reuse" or "extrapolate"; ``threshold``: set in dynamic mode
    (decisions per video at run time; ``compute`` is then all True)."""

    compute: Tuple[bool, ...]
    cfg: Tuple[bool, ...]
    reuse: str = DEFAULT_REUSE
    threshold: Optional[float] = None

    @property
    def steps(self) -> int:
        return len(self.compute)

    @property
    def dynamic(self) -> bool:
        return self.threshold is not None

    @classmethod
    def full(cls, steps: int) -> "StagePlan":
        """No cache, CFG on every step: the plain loop."""
        return cls((True,) * steps, (True,) * steps)


@dataclass(frozen=True)
class CachePlan:
    """A validated cache request: the mode, and each loop's :class:`StagePlan`."""

    mode: Optional[str]
    content: StagePlan
    motion: StagePlan
    guidance_interval: Optional[Tuple[float, float]] = None
    threshold: Optional[float] = None


def _static_flags(data: Dict[str, Any], config_name: str, stage: str, scheduler: str, steps: int,
                  threshold: Optional[float]) -> Tuple[bool, ...]:
    key = schedule_key(scheduler, steps)
    if threshold is not None:  # a schedule from the measured change at this threshold
        change = data.get("change", {}).get(stage, {}).get(key)
        if change is None:
            raise ValueError(f"model {config_name!r} has no measured {stage} change for {key} (scheduler/steps) to "
                             f"derive a schedule at cache_threshold={threshold:g}; calibrate it: {CALIBRATE_HINT} "
                             f"--scheduler {scheduler} --steps N --motion-steps N")
        if not isinstance(change, list) or len(change) != steps - 1:
            raise ValueError(f"model {config_name!r}: sampling.{CONFIG_KEY}.change.{stage}[{key!r}] must hold "
                             f"{steps - 1} numbers, got {change!r:.60}")
        return check_schedule(schedule_from_change(change, threshold), steps, f"{stage} {key}")
    schedule = data.get("schedules", {}).get(stage, {}).get(key)
    if schedule is None:
        have = sorted(data.get("schedules", {}).get(stage, {}))
        raise ValueError(f"model {config_name!r} has no static {stage} schedule for {key} (scheduler/steps; it has "
                         f"{', '.join(have) or 'none'}); calibrate one: {CALIBRATE_HINT} --scheduler {scheduler} "
                         f"--steps N --motion-steps N")
    return check_schedule(schedule, steps, f"model {config_name!r} static {stage} schedule {key}")


def plan_cache(config, scheduler: str, steps: int, motion_steps: int, cache: Optional[str] = None,
               cache_threshold=None, guidance_interval=None, backend=None, content: bool = True) -> CachePlan:
    """Validate a call's cache options against the model config (and backend) before any work.

    ``backend``: a backend class or instance (its ``cache_modes`` say what it supports) or None;
    ``content``: whether the content loop runs (False for image-to-video: no content schedule needed).
    Raises a one-line ValueError naming the bad value: an unknown mode, a threshold < 0 or without a
    mode, an interval outside [0, 1] or reversed, dynamic on a backend that runs whole graphs, a model
    without a schedule for these step counts, or a schedule that does not fit them."""
    if cache is not None and cache not in CACHE_MODES:
        raise ValueError(f"cache must be None, 'static' or 'dynamic', got {cache!r}")
    threshold = check_threshold(cache_threshold) if cache_threshold is not None else None
    if threshold is not None and cache is None:
        raise ValueError(f"cache_threshold={threshold:g} needs cache='static' or 'dynamic'")
    interval = check_guidance_interval(guidance_interval) if guidance_interval is not None else None
    if cache == "dynamic":
        modes = backend.cache_modes if backend is not None else CACHE_MODES  # engine.backends.base.Backend
        if "dynamic" not in modes:
            name = backend.name
            raise ValueError(f"cache='dynamic' decides on the host at every step and needs a backend that runs the "
                             f"networks in pieces (eager, compile); backend {name!r} supports cache='static'")
        why = unet_supports_split(config.content_unet) if content else None
        if why:
            raise ValueError(why)
    data = cache_data(config) or {}
    reuse = data.get("reuse", DEFAULT_REUSE)
    plans = {}
    for stage, n, runs in (("content", steps, content), ("motion", motion_steps, True)):
        cfg = guidance_steps(interval, n)
        if cache == "static" and runs:
            if not data:
                raise ValueError(f"model {config.name!r} has no static cache schedule (sampling.{CONFIG_KEY} in its "
                                 f"config); calibrate one: {CALIBRATE_HINT}")
            plans[stage] = StagePlan(_static_flags(data, config.name, stage, scheduler, n, threshold), cfg, reuse)
        elif cache == "dynamic":
            dyn = threshold if threshold is not None else data.get("dynamic_threshold", DEFAULT_DYNAMIC_THRESHOLD)
            plans[stage] = StagePlan((True,) * n, cfg, reuse, check_threshold(dyn))
        else:
            plans[stage] = StagePlan((True,) * n, cfg, reuse)
    return CachePlan(cache, plans["content"], plans["motion"], interval, threshold)


# ------------------------------------------------------------------------------------------ run time


class OutputHistory:
    """The last two computed (guided) outputs of a static loop; a skipped step takes the last one
    ("reuse") or the line through both at its step ("extrapolate"). Host floats only: no sync."""

    def __init__(self, reuse: str = DEFAULT_REUSE):
        self.reuse = reuse
        self.last: Optional[Tuple[int, torch.Tensor]] = None
        self.prev: Optional[Tuple[int, torch.Tensor]] = None

    def store(self, i: int, out: torch.Tensor) -> None:
        # A clone: a backend may hand back a buffer it overwrites on its next call (cudagraph, TensorRT).
        self.prev, self.last = self.last, (i, out.clone())

    def predict(self, i: int) -> torch.Tensor:
        if self.last is None:
            raise RuntimeError("a reuse step before any computed step (schedules start with a full step)")
        i1, o1 = self.last
        if self.reuse == "reuse" or self.prev is None:
            return o1
        i0, o0 = self.prev
        return o1 + (o1 - o0) * ((i - i1) / (i1 - i0))


def relative_change(now: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row (first axis): mean |now - ref| / mean |ref|, in float32."""
    now, ref = now.float().flatten(1), ref.float().flatten(1)
    return (now - ref).abs().mean(1) / ref.abs().mean(1).clamp_min(1e-12)


def guide(out: torch.Tensor, videos: int, cfg: bool, guidance: float) -> torch.Tensor:
    """The CFG combination uncond + s (cond - uncond) of a [cond ; uncond] batch, or the batch itself."""
    if not cfg:
        return out
    cond, uncond = out[:videos], out[videos:]
    return uncond + guidance * (cond - uncond)


@dataclass
class Evaluations:
    """Sample evaluations of one loop: ``full`` rows ran the whole network, ``first_block`` rows only its
    first block (dynamic mode's skipped rows). A CFG pair is two rows."""

    full: int = 0
    first_block: int = 0
    calls: int = 0  # network calls (batches) that ran the whole network


class UNetParts:
    """A diffusers ``UNet2DConditionModel`` as two pieces for the dynamic mode: ``head`` (time embedding,
    ``conv_in``, first down block) and ``tail`` (the other down blocks, mid block, up blocks, output),
    the same calls in the same order as diffusers' ``forward`` for text-conditioned UNets without class
    or added embeddings (``tests/engine/test_cache.py`` checks head + tail == forward exactly).
    ``compile``: a function that wraps each piece (e.g. ``torch.compile``)."""

    def __init__(self, unet, compile=None):
        why = unet_supports_split(dict(unet.config))
        if why:
            raise ValueError(why)
        self.unet = unet
        wrap = compile or (lambda f: f)
        self.head = wrap(self._head)
        self.tail = wrap(self._tail)

    def _head(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """sample (N, C, h, w), timestep (N,), states (N, T, d) -> the state (batch-first tensors):
        first block output (the indicator), time embedding, states, then the skip connections so far."""
        u = self.unet
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        h0 = u.conv_in(sample)
        h, res = self._down(u.down_blocks[0], h0, emb, states)
        return (h, emb, states, h0) + tuple(res)

    @staticmethod
    def _down(block, h, emb, states):
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, encoder_hidden_states=states)
        return block(hidden_states=h, temb=emb)

    def _tail(self, h: torch.Tensor, emb: torch.Tensor, states: torch.Tensor, *res: torch.Tensor) -> torch.Tensor:
        """A head state (any subset of its rows) -> the UNet output of those rows."""
        u = self.unet
        down_res = tuple(res)
        # diffusers passes explicit upsample sizes when the sample is not a multiple of all upsamplings.
        forward_upsample_size = any(d % (2 ** u.num_upsamplers) for d in res[0].shape[-2:])
        upsample_size = None
        for block in u.down_blocks[1:]:
            h, more = self._down(block, h, emb, states)
            down_res += tuple(more)
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                h = u.mid_block(h, emb, encoder_hidden_states=states)
            else:
                h = u.mid_block(h, emb)
        for i, block in enumerate(u.up_blocks):
            skips = down_res[-len(block.resnets):]
            down_res = down_res[: -len(block.resnets)]
            if i < len(u.up_blocks) - 1 and forward_upsample_size:
                upsample_size = down_res[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=states,
                          upsample_size=upsample_size)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, upsample_size=upsample_size)
        if u.conv_norm_out:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)


class DiTParts:
    """The motion DiT in three pieces for the dynamic mode (First-Block-Cache): ``head`` (embeddings and
    the first block), ``tail`` (the other blocks) and ``final`` (the output head); head, tail, final ==
    ``MotionDiT.forward``. ``compile``: a function that wraps each piece (e.g. ``torch.compile``)."""

    def __init__(self, dit, compile=None):
        self.dit = dit
        wrap = compile or (lambda f: f)
        self.head = wrap(self._head)
        self.tail = wrap(self._tail)
        self.final = wrap(self._final)

    def _head(self, motion, timestep, content, text):
        """-> (x1 first block output (N, tokens, d), r1 its residual x1 - x0 (the indicator), c (N, d))."""
        x0, c, _ = self.dit.embed(motion, timestep, content, text)
        x1 = self.dit.blocks[0](x0, c)
        return x1, x1 - x0, c

    def _tail(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.dit.blocks[1:]:
            x = block(x, c)
        return x

    def _final(self, x: torch.Tensor, c: torch.Tensor, motion_shape: Tuple[int, ...]) -> torch.Tensor:
        p = self.dit.config.patch_size
        return self.dit.unembed(x, c, (motion_shape[-2] // p, motion_shape[-1] // p))


class DynamicStep:
    """One loop's dynamic cache (First-Block-Cache), per video: ``step(i, batch, t, *cond)`` runs the
    network's first block on the batch, decides on the host which videos changed enough since their last
    full evaluation (relative L1 of the first block's output, DiT: of its residual, >= ``threshold``;
    always at the first and the last step), runs the rest of the network on those videos' rows only, and
    returns the guided output (B, ...) float32.

    Skipped videos: the UNet ("unet") takes its last output, or the line through its last two (the plan's
    ``reuse``); the DiT ("dit") adds its cached residual of the remaining blocks (the last full
    evaluation's, per CFG row) to the fresh first-block output and runs the output head. A video's
    decisions depend on its own rows only, so a batch gives each video what it would get alone."""

    def __init__(self, kind: str, parts, plan: StagePlan, videos: int, guidance: float,
                 evaluations: Optional[Evaluations] = None):
        if kind not in ("unet", "dit"):
            raise ValueError(f"kind must be 'unet' or 'dit', got {kind!r}")
        self.kind, self.parts, self.plan = kind, parts, plan
        self.videos, self.guidance = videos, guidance
        self.evaluations = evaluations if evaluations is not None else Evaluations()
        self.threshold = plan.threshold if plan.threshold is not None else 0.0
        self.ref: Optional[torch.Tensor] = None  # (B, ...) indicator at each video's last full evaluation
        # UNet: per video, the last two computed outputs and their steps.
        self.last_out: Optional[torch.Tensor] = None
        self.prev_out: Optional[torch.Tensor] = None
        self.last_step: List[Optional[int]] = [None] * videos
        self.prev_step: List[Optional[int]] = [None] * videos
        # DiT: per CFG row (cond rows 0..B-1, uncond rows B..2B-1), the rest of the blocks' residual.
        self.residual: Optional[torch.Tensor] = None
        self.valid = [False] * (2 * videos)

    def _decide(self, i: int, indicator: torch.Tensor, cfg: bool) -> List[int]:
        b = self.videos
        if self.ref is None or i == self.plan.steps - 1:
            need = [True] * b
        else:
            skip = (relative_change(indicator, self.ref) < self.threshold).tolist()  # the host decides: a sync
            if self.kind == "dit":  # a skipped row needs a cached residual
                skip = [s and self.valid[k] and (not cfg or self.valid[b + k]) for k, s in enumerate(skip)]
            need = [not s for s in skip]
        idx = [k for k in range(b) if need[k]]
        if self.ref is None:
            self.ref = indicator.float().clone()
        elif idx:
            r = torch.tensor(idx, device=indicator.device)
            self.ref.index_copy_(0, r, indicator.index_select(0, r).float())
        return idx

    def __call__(self, i: int, batch: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        b, n = self.videos, batch.shape[0]
        cfg = n == 2 * b
        head = self.parts.head(batch, t, *cond)
        indicator = head[1] if self.kind == "dit" else head[0]
        idx = self._decide(i, indicator[:b], cfg)
        rows = idx + [b + k for k in idx] if cfg else idx
        self.evaluations.full += len(rows)
        self.evaluations.first_block += n - len(rows)
        self.evaluations.calls += bool(rows)
        r = torch.tensor(rows, dtype=torch.long, device=batch.device)
        if self.kind == "dit":
            return self._dit(head, batch, r, rows, cfg)
        return self._unet(i, head, r, idx, cfg)

    def _unet(self, i: int, head, r: torch.Tensor, idx: List[int], cfg: bool) -> torch.Tensor:
        b = self.videos
        computed = None
        if idx:
            full = self.parts.tail(*(s.index_select(0, r) for s in head)).float()
            computed = guide(full, len(idx), cfg, self.guidance)
        if len(idx) == b:
            out = computed
        else:
            out = self._predict(i)
            if idx:
                out = out.index_copy(0, r[: len(idx)], computed)
        if idx:
            k = r[: len(idx)]
            if self.last_out is None:
                self.last_out, self.prev_out = computed.clone(), computed.clone()
            else:
                self.prev_out.index_copy_(0, k, self.last_out.index_select(0, k))
                self.last_out.index_copy_(0, k, computed)
            for v in idx:
                self.prev_step[v], self.last_step[v] = self.last_step[v], i
        return out

    def _predict(self, i: int) -> torch.Tensor:
        weights = []
        for last, prev in zip(self.last_step, self.prev_step):
            extrapolate = self.plan.reuse == "extrapolate" and prev is not None
            weights.append((i - last) / (last - prev) if extrapolate else 0.0)
        w = torch.tensor(weights, dtype=self.last_out.dtype, device=self.last_out.device)
        w = w.reshape(-1, *([1] * (self.last_out.dim() - 1)))
        return self.last_out + w * (self.last_out - self.prev_out)

    def _dit(self, head, batch: torch.Tensor, r: torch.Tensor, rows: List[int], cfg: bool) -> torch.Tensor:
        x1, _, c = head
        n = batch.shape[0]
        if self.residual is None:
            self.residual = x1.new_zeros((2 * self.videos,) + tuple(x1.shape[1:]))
        x = x1 + self.residual[:n]
        if rows:
            full = self.parts.tail(x1.index_select(0, r), c.index_select(0, r))
            self.residual.index_copy_(0, r, full - x1.index_select(0, r))
            x = x.index_copy(0, r, full)  # computed rows exactly as the whole network gives them
            for k in rows:
                self.valid[k] = True
        out = self.parts.final(x, c, tuple(batch.shape)).float()
        return guide(out, self.videos, cfg, self.guidance)
