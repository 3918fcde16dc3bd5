"""A generation request, validated once: from the CLI's flags or the pipeline's keyword arguments to a
:class:`Request` that :meth:`engine.pipeline.CMDPipeline.run` runs as it is.

:func:`check_request` fills what a call leaves out from the model's config (its own size and
``config.sampling``, :class:`engine.configs.SamplingConfig`) and checks everything about the request
that the config decides: the clip size (one the model serves, :mod:`engine.geometry`), step counts,
guidance scales, the scheduler, batch multipliers and the step-caching options (:func:`engine.cache.plan_cache`).
It needs no weights, so callers check before loading any. What depends on the loaded backend (exported
graphs' sizes and batches) is :meth:`CMDPipeline.check_inputs` / :meth:`CMDPipeline.check_backend`.
:func:`parse_device` and :func:`parse_dtype` check where and in what precision it runs.
"""

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from engine.cache import CachePlan, plan_cache
from engine.cli import check_int, check_number
from engine.configs import CMDConfig
from engine.geometry import ClipGeometry, resolve_size, size_step
from engine.schedulers import SCHEDULERS, TIMESTEP_SPACINGS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

size_multiple = size_step  # heights and widths are multiples of this (engine.geometry)


@dataclass(frozen=True)
class Request:
    """A validated generation request (made by :func:`check_request`).

    ``num_frames`` x ``height`` x ``width``: the clip returned (pixels); ``steps`` / ``motion_steps``:
    denoising steps of the content UNet / motion DiT; ``guidance`` / ``motion_guidance``: their CFG scales
    (<= 1: no CFG batch); ``scheduler``: "ddim" or "dpm"; ``num_videos``: videos per prompt;
    ``motion_variations``: motions per content frame; ``geometry``: shapes of the clip generated (a served
    size, ``num_frames`` or more frames); ``cache_plan``: the step-caching mode and each loop's plan
    (:class:`engine.cache.CachePlan`); ``image_to_video``: the content frame comes from an image (the content
    loop does not run)."""

    num_frames: int
    height: int
    width: int
    steps: int
    motion_steps: int
    guidance: float
    motion_guidance: float
    scheduler: str
    num_videos: int
    motion_variations: int
    geometry: ClipGeometry
    cache_plan: CachePlan
    image_to_video: bool = False

    @property
    def generated_frames(self) -> int:
        """Frames generated: the smallest served length that holds num_frames (the first are kept)."""
        return self.geometry.frames


#: At most this many videos of one prompt in one request (num_videos_per_prompt x motion_variations).
MAX_VIDEOS_PER_PROMPT = 1024


def _int(name: str, value, low: int, high: Optional[int] = None, why: str = "") -> int:
    return check_int(name, value, low, high, why)


def _guidance(name: str, value) -> float:
    return check_number(name, value, low=0.0)


def check_request(config: CMDConfig, num_frames=None, height=None, width=None, num_inference_steps=None,
                  motion_steps=None, guidance_scale=None, motion_guidance_scale=None, scheduler=None,
                  num_videos_per_prompt=1, motion_variations=1, cache=None, cache_threshold=None,
                  guidance_interval=None, image_to_video: bool = False, backend=None) -> Request:
    """Fill defaults from the config (its own size, ``config.sampling``) and validate everything about a
    request; a one-line ValueError naming the bad value otherwise. The arguments are the pipeline call's
    (:meth:`engine.pipeline.CMDPipeline.__call__`). The size must be one the model serves
    (``config.sizes``, :func:`engine.geometry.resolve_size`), or fewer frames of one. ``cache``,
    ``cache_threshold``, ``guidance_interval``: step caching (:func:`engine.cache.plan_cache`; a static
    schedule must exist for the scheduler and step counts); ``image_to_video``: the content loop does not
    run (no content schedule needed); ``backend``: a backend class or instance whose cache modes to check
    (None: any). Needs only the config, so callers can check before loading weights."""
    s = config.sampling  # the defaults (engine.configs.SamplingConfig)
    dims = [None if v is None else _int(name, v, 1)
            for name, v in (("num_frames", num_frames), ("height", height), ("width", width))]
    size, generated = resolve_size(config, *dims)
    train_steps = config.content_scheduler.num_train_timesteps
    steps = _int("num_inference_steps", s.steps if num_inference_steps is None else num_inference_steps,
                 1, train_steps)
    mtrain = config.motion_scheduler.num_train_timesteps
    if motion_steps is None:  # the config's, else the content loop's
        motion_steps = steps if s.motion_steps is None else s.motion_steps
    msteps = _int("motion_steps", motion_steps, 1, mtrain)
    guidance = _guidance("guidance_scale", s.guidance if guidance_scale is None else guidance_scale)
    if motion_guidance_scale is None:  # the config's, else the content loop's
        motion_guidance_scale = guidance if s.motion_guidance is None else s.motion_guidance
    mguidance = _guidance("motion_guidance_scale", motion_guidance_scale)
    scheduler = s.scheduler if scheduler is None else scheduler
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    spacing = s.timestep_spacing
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"config sampling.timestep_spacing {spacing!r} is unknown; choose from "
                         f"{', '.join(TIMESTEP_SPACINGS)}")
    videos = _int("num_videos_per_prompt", num_videos_per_prompt, 1, MAX_VIDEOS_PER_PROMPT)
    variations = _int("motion_variations", motion_variations, 1, MAX_VIDEOS_PER_PROMPT // videos,
                      f" (at most {MAX_VIDEOS_PER_PROMPT} videos a prompt with {videos} per prompt)")
    cache_plan = plan_cache(config, scheduler, steps, msteps, cache, cache_threshold, guidance_interval, backend,
                            content=not image_to_video)
    return Request(size.frames, size.height, size.width, steps, msteps, guidance, mguidance, scheduler,
                   videos, variations, config.geometry(generated), cache_plan, bool(image_to_video))


# The pipeline call's keyword arguments that make a request (check_request's, less the config and the
# caller's context).
REQUEST_ARGS = tuple(p for p in inspect.signature(check_request).parameters
                     if p not in ("config", "image_to_video", "backend"))


def check_prompt_lengths(encoder, texts: Sequence[Tuple[str, str]]) -> None:
    """A prompt the text encoder would cut short is bad input (the video would ignore its end). ``texts``:
    ``(name, text)`` pairs, the name as the caller's user knows it (``--prompt``, ``prompt``, ``line 3 of
    'p.txt'``); ``encoder``: a text encoder with ``num_tokens`` and ``max_length``. A one-line ValueError
    naming the first too long."""
    if not texts:
        return
    for (name, _), n in zip(texts, encoder.num_tokens([t for _, t in texts])):
        if n > encoder.max_length:
            raise ValueError(f"{name} is too long for the text encoder: {n} tokens, at most {encoder.max_length}")


def parse_dtype(dtype) -> torch.dtype:
    """'float32', 'bfloat16' or 'float16' (or that torch.dtype); a ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; choose from {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (or a torch.device); a ValueError if unknown or CUDA is missing."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev
