"""An API request's fields (a JSON object or a form) -> the job's parameters, checked by the engine's one request
check (:func:`engine.request.check_request`) before anything is queued.

The fields (all but ``prompt`` optional; a request with only a prompt gets the model's defaults):

=====================  ======================================  ====================================
field                  meaning                                 pipeline argument
=====================  ======================================  ====================================
prompt                 the text of the video                   prompt
negative_prompt        what the content frame should not show  negative_prompt
size                   ``WIDTHxHEIGHT`` (OpenAI's form)        width, height
width, height          pixels (instead of size)                width, height
frames                 frames of the clip                      num_frames
steps, motion_steps    denoising steps of each loop            num_inference_steps, motion_steps
guidance               content CFG scale                       guidance_scale
motion_guidance        motion CFG scale                        motion_guidance_scale
scheduler              ddim or dpm                             scheduler
cache                  static or dynamic step caching          cache
cache_threshold        its threshold                           cache_threshold
seed                   the noise seed (default: a random one)  generator (one per prompt)
fps                    frames per second of the mp4            (writer)
model                  must name the served model if given     --
image                  image-to-video (form upload only)       image
=====================  ======================================  ====================================

Form fields arrive as text; JSON fields as JSON values. Either way a bad value is a one-line ValueError naming
it, the same words as the CLI's where the check is the engine's.
"""

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from engine.cli import check_int, check_number
from engine.configs import CMDConfig
from engine.request import Request, check_request
from engine.video_io import FPS_MAX, FPS_MIN

# API field -> check_request's keyword; None: not a request argument.
FIELDS = {
    "prompt": None, "negative_prompt": None, "size": None, "width": "width", "height": "height",
    "frames": "num_frames", "steps": "num_inference_steps", "motion_steps": "motion_steps",
    "guidance": "guidance_scale", "motion_guidance": "motion_guidance_scale", "scheduler": "scheduler",
    "cache": "cache", "cache_threshold": "cache_threshold", "seed": None, "fps": None, "model": None,
}
INTEGERS = ("width", "height", "frames", "steps", "motion_steps", "seed")
NUMBERS = ("guidance", "motion_guidance", "cache_threshold", "fps")
TEXTS = ("prompt", "negative_prompt", "size", "scheduler", "cache", "model")
# The parameters that do not change the networks' batch: jobs that differ only in these share a pipeline call.
PER_JOB = ("prompt", "negative_prompt", "seed", "fps")
MAX_SEED = 2**63 - 1

# The create request's body for the OpenAPI docs (the check itself is check_fields').
PARAM_SCHEMA = {
    "type": "object", "required": ["prompt"], "additionalProperties": False,
    "properties": {name: {"type": "integer" if name in INTEGERS else "number" if name in NUMBERS else "string"}
                   for name in FIELDS},
}


@dataclass(frozen=True)
class Limits:
    """What one request may hold: ``body_bytes`` (the whole body), ``prompt_chars`` (prompt and negative
    prompt, before the text encoder's own token limit), ``image_bytes`` (an uploaded file) and
    ``image_pixels`` (its decoded width x height)."""

    body_bytes: int = 16 << 20
    prompt_chars: int = 2000
    image_bytes: int = 8 << 20
    image_pixels: int = 4096 * 4096


def _integer(name: str, value) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                          and value != int(value)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _number(name: str, value) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def _text(name: str, value, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    if name in ("prompt", "negative_prompt") and len(value) > limits.prompt_chars:
        raise ValueError(f"{name} is too long: {len(value)} characters, at most {limits.prompt_chars}")
    return value


def _size(value: str) -> Tuple[int, int]:
    """``WIDTHxHEIGHT`` -> (width, height)."""
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size must be WIDTHxHEIGHT, e.g. 64x64, got {value!r}")
    return int(parts[0]), int(parts[1])


def typed_fields(fields: Dict[str, Any], limits: Limits) -> Dict[str, Any]:
    """The request's fields with their types checked (text from a form converted); unknown or null fields
    refused."""
    out = {}
    for name, value in fields.items():
        if name not in FIELDS:
            raise ValueError(f"unknown field {name!r}; known fields: {', '.join(FIELDS)}, image")
        if value is None:
            continue
        if name in INTEGERS:
            out[name] = _integer(name, value)
        elif name in NUMBERS:
            out[name] = _number(name, value)
        else:
            out[name] = _text(name, value, limits)
    return out


def check_fields(fields: Dict[str, Any], config: CMDConfig, model_name: str, limits: Limits = Limits(),
                 image: bool = False, backend=None) -> Tuple[Dict[str, Any], Request]:
    """An API request's fields -> ``(params, request)``: the job's parameters as the worker runs them (every
    default filled in, a seed drawn where none was given) and the engine's checked
    :class:`~engine.request.Request`. ``image``: an image was uploaded (image-to-video). ``backend``: the
    served backend (its cache modes). A one-line ValueError naming the bad field otherwise."""
    f = typed_fields(fields, limits)
    if not f.get("prompt", "").strip():
        raise ValueError("prompt is required (a non-empty string)")
    if "model" in f and f["model"] != model_name:
        raise ValueError(f"model {f['model']!r} is not served here; this server serves {model_name!r}")
    if "size" in f:
        if "width" in f or "height" in f:
            raise ValueError("give size or width/height, not both")
        f["width"], f["height"] = _size(f["size"])
    # The engine's one range rule (engine.cli); seeds also fit the job store's signed 64-bit column.
    seed = check_int("seed", f.get("seed", secrets.randbelow(MAX_SEED)), 0, MAX_SEED, " (the job store's range)")
    fps = check_number("fps", f.get("fps", float(config.sampling.fps)), FPS_MIN, FPS_MAX)
    kwargs = {arg: f[name] for name, arg in FIELDS.items() if arg is not None and name in f}
    request = check_request(config, image_to_video=image, backend=backend, **kwargs)
    params = dict(prompt=f["prompt"], negative_prompt=f.get("negative_prompt"), seed=seed, fps=fps, image=image,
                  num_frames=request.num_frames, height=request.height, width=request.width,
                  num_inference_steps=request.steps, motion_steps=request.motion_steps,
                  guidance_scale=request.guidance, motion_guidance_scale=request.motion_guidance,
                  scheduler=request.scheduler, cache=f.get("cache"), cache_threshold=f.get("cache_threshold"))
    return params, request


def request_of(params: Dict[str, Any], config: CMDConfig, backend=None) -> Request:
    """The engine request of a stored job's parameters (checked again: the same answer as at submission)."""
    kwargs = {k: params[k] for k in ("num_frames", "height", "width", "num_inference_steps", "motion_steps",
                                      "guidance_scale", "motion_guidance_scale", "scheduler", "cache",
                                      "cache_threshold")}
    return check_request(config, image_to_video=params["image"], backend=backend, **kwargs)


def batch_key(params: Dict[str, Any]) -> str:
    """Jobs with equal keys can share one pipeline call: every parameter but the per-job ones (prompt, negative
    prompt, seed, fps)."""
    return json.dumps({k: v for k, v in params.items() if k not in PER_JOB}, sort_keys=True)


def request_hash(fields: Dict[str, Any], image: Optional[bytes]) -> str:
    """A digest of what a client sent (fields and image), to tell an Idempotency-Key's retry from a reuse."""
    import hashlib

    h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    if image is not None:
        h.update(hashlib.sha256(image).digest())
    return h.hexdigest()
