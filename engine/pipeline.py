"""CMDPipeline: text (or an image) -> video, in the diffusers style (DESIGN 2 and 6).

    prompts --text encoder--> token states, pooled
      --content UNet loop (CFG with a negative prompt)--> content frame xbar   [or a given image]
      --motion DiT loop (CFG on the text only; xbar in both halves)--> motion latent z
      --AE decoder(xbar, z)--> frames   [--image VAE per frame, chunked, latent mode]

The networks run through a backend (:mod:`engine.backends`); the pipeline builds the CFG batches,
runs the scheduler loops (:mod:`engine.schedulers`), draws the noise and times the stages.

``pipe(prompt, ...)`` is the diffusers-style front: it validates its keyword arguments into a
:class:`~engine.request.Request` (:mod:`engine.request`, with the model's defaults) and runs it;
``pipe.run(request, prompt, ...)`` runs a request validated earlier (the CLI and the benchmarks validate
once, before loading weights, and run it for every batch).

Seeds: noise is drawn on the CPU from one generator per prompt (``generator=seed`` gives prompt i
the seed ``seed + i``), so a prompt's video does not depend on the batch it ran in or the device.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from engine.adapters import LoraMixin, remember_base_hashes
from engine.backends import Backend, check_backend_ready, get_backend
from engine.cache import DynamicStep, Evaluations, OutputHistory, StagePlan, guide, plan_cache
from engine.cli import check_seed
from engine.configs import CMDConfig
from engine.default_model import ModelSpec, resolve_model
from engine.models.bundle import CMDModel
from engine.networks import NetworkCall
from engine.profiling import StageTimer, nvtx_range
# The request's module; check_request and size_multiple are also documented here (README).
from engine.request import Request, check_request, parse_device, parse_dtype, size_multiple  # noqa: F401
from engine.schedulers import make_sampler

OUTPUT_TYPES = ("np", "pt", "latent")

Generator = Union[None, int, torch.Generator, Sequence[torch.Generator]]


@dataclass
class CMDPipelineOutput:
    """``frames``: (B, L, H, W, 3) float32 numpy in [0, 1] ("np"), (B, L, 3, H, W) torch in [0, 1]
    ("pt"), or None ("latent"). ``content`` (B, C, H, W) and ``motion`` (B, D, L, H'+W') are the
    generated latents (content in [-1, 1] pixels in pixel mode). ``timings``: seconds per stage
    (text, content, motion, decode, vae) and total. ``prompts``: the prompt of each video.
    ``evaluations``: denoiser sample evaluations of the call (a CFG pair is two; a batch of B videos B
    times one video's): ``content`` / ``motion`` ran the whole network, ``content_first_block`` /
    ``motion_first_block`` only its first block (``cache="dynamic"``'s skipped rows).
    Batch order: prompt, then video of that prompt, then motion variation."""

    frames: Any
    content: torch.Tensor
    motion: torch.Tensor
    timings: Dict[str, float] = field(default_factory=dict)
    prompts: List[str] = field(default_factory=list)
    evaluations: Dict[str, int] = field(default_factory=dict)


def load_text_encoder(config: CMDConfig, random_weights: bool = False):
    """The text encoder a config names (MiniLM or CLIP), or a random-weight one (``random_weights``
    or ``text_encoder.kind == "random"``) of the config's width and length."""
    cfg = config.text_encoder
    if random_weights or cfg.kind == "random":
        from engine.random_text import RandomTextEncoder

        return RandomTextEncoder(cfg.hidden_size, cfg.max_length)
    from engine.models.text import TextEncoder

    try:
        return TextEncoder.from_config(cfg)
    except (RuntimeError, OSError) as e:  # package missing or folder unreadable
        raise ValueError(f"cannot load the text encoder ({cfg.kind}): {str(e).splitlines()[0]}") from None


def _check_output_type(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; choose from {', '.join(OUTPUT_TYPES)}")


def _prompt_list(name: str, value, n: Optional[int] = None) -> List[str]:
    if isinstance(value, str):
        return [value] * (n or 1)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    if n is not None and len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
    return list(value)


def _generators(generator: Generator, n: int) -> List[Optional[torch.Generator]]:
    """One generator per prompt: an int seeds prompt i with seed + i; one Generator is shared in order."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        seed = check_seed("generator", generator, n)  # prompt i's seed + i must be a seed too
        return [torch.Generator().manual_seed(seed + i) for i in range(n)]
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} prompts")
        return list(generator)
    raise ValueError(f"generator must be None, a seed, a torch.Generator or one per prompt, got {generator!r}")


def _randn(shape, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def _initial_noise(req: Request, gens: List[Optional[torch.Generator]]):
    """(content noise, motion noise) of a request: per prompt, its content noise, then its motion noise, from
    its own generator (so a prompt's video does not depend on its batch)."""
    v, m, geo = req.num_videos, req.motion_variations, req.geometry
    content_noise, motion_noise = [], []
    for g in gens:
        content_noise.append(_randn((v, *geo.content_shape), g))
        motion_noise.append(_randn((v * m, *geo.motion_shape), g))
    return torch.cat(content_noise), torch.cat(motion_noise)


class _Progress:
    """A tqdm bar per loop. On CUDA it is kept honest without stalling the device: after enqueuing
    step i it waits for step i - 1 to finish, so the device always has one step queued."""

    def __init__(self, total: int, desc: str, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = enabled and device.type == "cuda"
        self._pending = None
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def step(self) -> None:
        if not self.enabled:
            return
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
            if self._pending is not None:
                self._pending.synchronize()
                self.bar.update(1)
            self._pending = event
        else:
            self.bar.update(1)

    def close(self) -> None:
        if self._pending is not None:
            self._pending.synchronize()
            self.bar.update(1)
            self._pending = None
        if self.bar is not None:
            self.bar.close()


class CMDPipeline(LoraMixin):
    """``CMDPipeline(model, text_encoder, backend="eager")``: the model's networks run through the
    named backend (or a :class:`~engine.backends.Backend` instance) on the model's device and dtype.
    Adapters (LoRA): ``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ``unfuse_lora``,
    ``unload_lora_weights`` (:class:`engine.adapters.LoraMixin`).
    ``text_encoder``: anything with the ``TextEncoder`` interface."""

    def __init__(self, model: CMDModel, text_encoder, backend: Union[str, Backend] = "eager",
                 backend_options: Optional[Dict[str, Any]] = None):
        self.model = model.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.config: CMDConfig = model.config
        self.vae_chunk = 8  # frames per image-VAE decode call (latent mode): bounds memory
        self.set_backend(backend, **(backend_options or {}))

    # ----------------------------------------------------------------------------------------- set-up
    @classmethod
    def from_pretrained(cls, model: Optional[str] = "default", device="cpu", dtype="float32",
                        backend: Union[str, Backend] = "eager", text_encoder=None,
                        backend_options: Optional[Dict[str, Any]] = None) -> "CMDPipeline":
        """A model spec (``default``, a model folder, or ``random:<config>``; see
        :mod:`engine.default_model`) on ``device`` in ``dtype``. The text encoder is the one the
        config names unless given (random-weight for ``random:`` specs). A bad spec (an unknown config, an
        incomplete model folder) or a backend that cannot run here (no exported graphs or plans, TensorRT or
        CUDA missing: :func:`engine.backends.check_backend_ready`) is a one-line ValueError before any
        weights load."""
        dev, dt = parse_device(device), parse_dtype(dtype)
        spec = model if isinstance(model, ModelSpec) else resolve_model(model)
        if not isinstance(backend, Backend):
            check_backend_ready(backend, dev, dt, **(backend_options or {}))
        if spec.is_random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the same random model every time
                net = CMDModel.from_config(spec.random_config)
        else:
            net = CMDModel.from_pretrained(spec.path)
        if dt != torch.float32:  # what an adapter records of its base: the float32 weights' hash
            remember_base_hashes(net)
        net = net.to(device=dev, dtype=dt)
        if text_encoder is None:
            text_encoder = load_text_encoder(net.config, random_weights=spec.is_random)
        text_encoder = text_encoder.to(dev)
        return cls(net, text_encoder, backend, backend_options)

    def set_backend(self, backend: Union[str, Backend], **options) -> "CMDPipeline":
        """Switch how the networks run; a name from :func:`engine.backends.available_backends`."""
        if isinstance(backend, Backend):
            self.backend = backend
        else:
            self.backend = self._make_backend(lambda: get_backend(backend)(self.model, self.device, self.dtype,
                                                                          **options))
        # A backend that runs the text encoder itself (onnxruntime: the exported graph and its saved
        # tokenizer) replaces the PyTorch one while it is in use.
        self.backend_text_encoder = self.backend.text_encoder()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.content_unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.content_unet.parameters()).dtype

    def to(self, device=None, dtype=None) -> "CMDPipeline":
        """Move the model (and text encoder) and rebuild the backend for the new device/dtype."""
        dev = parse_device(device) if device is not None else self.device
        dt = parse_dtype(dtype) if dtype is not None else self.dtype
        self.model.to(device=dev, dtype=dt)
        self.text_encoder.to(dev)
        return self.set_backend(self.backend.name)

    def check_inputs(self, num_prompts: int = 1, image: bool = False, output_type: str = "np", **kwargs) -> Request:
        """:func:`~engine.request.check_request` against this pipeline's model config and backend (``kwargs``:
        the request's keyword arguments of :meth:`__call__`), then the backend's limits (shape buckets,
        batch ranges of exported graphs) for a call with ``num_prompts`` prompts, an image or not and
        ``output_type``: the validated :class:`~engine.request.Request`, or a one-line ValueError before any
        network runs."""
        req = check_request(self.config, image_to_video=image, backend=self.backend, **kwargs)
        self.backend.check_calls(self.network_calls(req, num_prompts, image, output_type))
        return req

    def check_backend(self, request: Request, num_prompts: int = 1, output_type: str = "np") -> None:
        """What a request checked without this backend (:func:`~engine.request.check_request` from the config
        alone) still needs: the backend's cache modes and its limits (shape buckets, batch ranges of exported
        graphs) for ``num_prompts`` prompts and ``output_type``; a one-line ValueError otherwise."""
        _check_output_type(output_type)
        plan = request.cache_plan
        if plan.mode == "dynamic":  # the backend's cache modes, by engine.cache's rule
            plan_cache(self.config, request.scheduler, request.steps, request.motion_steps, plan.mode, plan.threshold,
                       plan.guidance_interval, self.backend, content=not request.image_to_video)
        self.backend.check_calls(self.network_calls(request, num_prompts, request.image_to_video, output_type))

    def network_calls(self, req: Request, num_prompts: int = 1, image: Optional[bool] = None,
                      output_type: str = "np") -> List[NetworkCall]:
        """The backend calls a pipeline call makes for ``req``: per network, the clip size and the
        largest batch (classifier-free guidance doubles the denoisers' batch). ``image``: image-to-video
        (None: the request's ``image_to_video``)."""
        image = req.image_to_video if image is None else image
        size = req.geometry.size
        videos = num_prompts * req.num_videos
        motions = videos * req.motion_variations
        made = f"{num_prompts} prompt(s) x {req.num_videos} video(s)"
        calls = []
        if self.backend_text_encoder is not None:
            negatives = not image and req.guidance > 1.0
            calls.append(NetworkCall("text_encoder", size, num_prompts * (2 if negatives else 1),
                                     f"{num_prompts} prompt(s)" + (" and their negative prompts" if negatives else "")))
        if not image:
            cfg = req.guidance > 1.0
            calls.append(NetworkCall("content_unet", size, videos * (2 if cfg else 1),
                                     made + (", x 2 for guidance" if cfg else "")))
        cfg = req.motion_guidance > 1.0
        made += f" x {req.motion_variations} motion variation(s)"
        calls.append(NetworkCall("motion_dit", size, motions * (2 if cfg else 1),
                                 made + (", x 2 for guidance" if cfg else "")))
        if output_type != "latent":
            calls.append(NetworkCall("ae_decoder", size, motions, made))
            if self.config.space == "latent":
                calls.append(NetworkCall("vae_decoder", size, min(self.vae_chunk, motions * size.frames),
                                         "frames per image-VAE call (pipe.vae_chunk)"))
        return calls

    # ----------------------------------------------------------------------------------------- stages
    @torch.no_grad()
    def encode_prompt(self, prompts: List[str], negative_prompts: Optional[List[str]]):
        """-> (states (B, T, d), pooled (B, d), negative states (B, T, d) or None), in the model dtype.
        Prompts and negatives go through the encoder in one batch."""
        texts = prompts + (negative_prompts or [])
        states, pooled = (self.backend_text_encoder or self.text_encoder)(texts)
        states = states.to(self.device, self.dtype)
        pooled = pooled.to(self.device, self.dtype)
        b = len(prompts)
        negative = states[b:] if negative_prompts is not None else None
        return states[:b], pooled[:b], negative

    def _sampler(self, kind: str, steps: int, stage: str):
        sched = self.config.content_scheduler if stage == "content" else self.config.motion_scheduler
        # Predicted x0 is clamped to [-1, 1] where the config says the data lives there (sched.clip_sample).
        return make_sampler(kind, sched, steps, self.device, self.backend.device_scheduler,
                            timestep_spacing=self.config.sampling.timestep_spacing)

    def _loop(self, stage: str, denoise: Callable, x: torch.Tensor, steps: int, guidance: float,
              scheduler: str, callback, progress: bool, plan: Optional[StagePlan] = None,
              dynamic: Optional[DynamicStep] = None, evaluations: Optional[Evaluations] = None) -> torch.Tensor:
        """One denoising loop; ``denoise(batch, t)`` runs the backend on the (CFG) batch. ``plan``
        (:mod:`engine.cache`): per step, whether the network runs or the step reuses, and whether the CFG
        batch runs; it is fixed before the loop, so the loop never asks the device. ``dynamic``: a
        :class:`~engine.cache.DynamicStep` that replaces ``denoise`` (per-video first-block decisions)."""
        sampler = self._sampler(scheduler, steps, stage)
        plan = plan or StagePlan.full(len(sampler))
        if plan.steps != len(sampler):
            raise ValueError(f"the {stage} cache plan has {plan.steps} steps, the {scheduler} loop {len(sampler)}")
        history = None if all(plan.compute) else OutputHistory(plan.reuse)
        evaluations = evaluations if evaluations is not None else Evaluations()
        bar = _Progress(len(sampler), stage, progress, self.device)
        try:
            for i in range(len(sampler)):
                with nvtx_range(f"{stage} step {i}"):
                    t = sampler.timestep(i)
                    # diffusers' convention: guidance <= 1 runs the conditional branch only
                    cfg = guidance > 1.0 and plan.cfg[i]
                    if plan.compute[i]:
                        batch = torch.cat([x, x]) if cfg else x
                        if dynamic is not None:
                            out = dynamic(i, batch.to(self.dtype), t.repeat(batch.shape[0]))
                        else:
                            out = denoise(batch.to(self.dtype), t.repeat(batch.shape[0])).float()
                            out = guide(out, x.shape[0], cfg, guidance)
                            evaluations.full += batch.shape[0]
                            evaluations.calls += 1
                        if history is not None:
                            history.store(i, out)
                    else:
                        out = history.predict(i)
                    x = sampler.step(i, out, x)
                if callback is not None:
                    update = callback(self, i, t, {"stage": stage, "latents": x, "num_steps": len(sampler)})
                    if isinstance(update, dict) and "latents" in update:
                        x = update["latents"].to(device=x.device, dtype=x.dtype)
                bar.step()
        finally:
            bar.close()
        return x

    @torch.no_grad()
    def generate_content(self, states: torch.Tensor, negative_states: Optional[torch.Tensor], noise: torch.Tensor,
                         steps: int, guidance: float, scheduler: Optional[str] = None, callback=None,
                         progress: bool = False, cache: Optional[StagePlan] = None,
                         evaluations: Optional[Evaluations] = None) -> torch.Tensor:
        """Content UNet loop: noise (B, C, h, w) -> content frames, CFG with the negative prompt states.
        ``cache``: the loop's :class:`~engine.cache.StagePlan` (reuse steps, guidance interval, dynamic
        threshold; None: every step, CFG everywhere); ``evaluations`` counts the network's work. ``scheduler``:
        "ddim" or "dpm" (None: the config's ``sampling.scheduler``)."""
        cond = torch.cat([states, negative_states]) if guidance > 1.0 else states

        def denoise(batch, t):  # a batch of B (CFG off at this step) takes the conditional half of cond
            return self.backend.unet_step(batch, t, cond[: batch.shape[0]])

        dynamic = None
        if cache is not None and cache.dynamic:
            step = DynamicStep("unet", self.backend.network_parts("unet"), cache, noise.shape[0], guidance, evaluations)
            dynamic = lambda i, batch, t: step(i, batch, t, cond[: batch.shape[0]])  # noqa: E731
        scheduler = scheduler or self.config.sampling.scheduler
        return self._loop("content", denoise, noise.to(self.device), steps, guidance, scheduler, callback, progress,
                          cache, dynamic, evaluations)

    @torch.no_grad()
    def generate_motion(self, content: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor, steps: int,
                        guidance: float, scheduler: Optional[str] = None, callback=None, progress: bool = False,
                        cache: Optional[StagePlan] = None, evaluations: Optional[Evaluations] = None) -> torch.Tensor:
        """Motion DiT loop: noise (B, D, L, H'+W') -> motion latents for content frames (B, C, h, w) and
        pooled text (B, d). CFG on the text only: the unconditional half gets the learned null text,
        both halves see the same content frame. ``scheduler``, ``cache``, ``evaluations``: as
        :meth:`generate_content`."""
        content = content.to(self.dtype)
        if guidance > 1.0:
            null = self.model.motion_dit.null_text.to(self.dtype)[None].expand(pooled.shape[0], -1)
            text, frames = torch.cat([pooled, null]), torch.cat([content, content])
        else:
            text, frames = pooled, content

        def denoise(batch, t):  # a batch of B (CFG off at this step) takes the conditional half
            n = batch.shape[0]
            return self.backend.dit_step(batch, t, frames[:n], text[:n])

        dynamic = None
        if cache is not None and cache.dynamic:
            step = DynamicStep("dit", self.backend.network_parts("dit"), cache, noise.shape[0], guidance, evaluations)
            dynamic = lambda i, batch, t: step(i, batch, t, frames[: len(batch)], text[: len(batch)])  # noqa: E731
        scheduler = scheduler or self.config.sampling.scheduler
        return self._loop("motion", denoise, noise.to(self.device), steps, guidance, scheduler, callback, progress,
                          cache, dynamic, evaluations)

    @torch.no_grad()
    def decode_latents(self, content: torch.Tensor, motion: torch.Tensor, timer: Optional[StageTimer] = None):
        """AE decode (+ image VAE per frame in latent mode) -> RGB video (B, L, 3, H, W) in [-1, 1]."""
        timer = timer or StageTimer(self.device)
        with timer.stage("decode"):
            video = self.backend.decode(content.to(self.dtype), motion.to(self.dtype))
        if self.config.space == "latent":
            with timer.stage("vae"):
                video = self.backend.decode_frames(video, self.vae_chunk)
        return video.float()

    def image_pixels(self, image, height: int, width: int, batch: int) -> torch.Tensor:
        """An image -> pixels (batch, 3, height, width) in [-1, 1] on the device. ``image``: any form
        :func:`engine.images.to_pixels` accepts (a path, a PIL image, a numpy array or torch tensor of uint8,
        uint16 or float in [0, 1], channels-last or -first, a batch of one or one per prompt), or a list of
        these (one per prompt); each is resized to (height, width) if needed. TypeError / ValueError for any
        other form."""
        from engine.images import to_pixels

        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if not items:
            raise ValueError("image is an empty list")
        tensors = []
        for item in items:
            pixels = to_pixels(item)
            if pixels.shape[-2:] != (height, width):
                pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True,
                                       align_corners=False).clamp(0, 1)  # resampling may overshoot [0, 1]
            tensors.append(pixels)
        pixels = torch.cat(tensors)
        if pixels.shape[0] == 1:
            pixels = pixels.expand(batch, -1, -1, -1)
        if pixels.shape[0] != batch:
            raise ValueError(f"got {pixels.shape[0]} images for {batch} prompts")
        return (pixels * 2 - 1).to(self.device)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> content frames (B, C, h, w): the pixels themselves in pixel mode,
        their image-VAE latents in latent mode."""
        if self.config.space == "latent":
            from engine.models.vae import encode_frames

            return encode_frames(self.model.vae, pixels[:, None].to(self.dtype), chunk=self.vae_chunk)[:, 0].float()
        return pixels

    def prepare_image(self, image, height: int, width: int, batch: int) -> torch.Tensor:
        """An image (any form :meth:`image_pixels` takes) -> the content frame (batch, C, h, w)."""
        return self.encode_image(self.image_pixels(image, height, width, batch))

    # ----------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], negative_prompt: Union[None, str, List[str]] = None,
                 num_frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, motion_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, motion_guidance_scale: Optional[float] = None,
                 scheduler: Optional[str] = None, num_videos_per_prompt: int = 1, generator: Generator = None,
                 image=None, motion_variations: int = 1, output_type: str = "np",
                 callback_on_step_end: Optional[Callable] = None, progress: bool = True,
                 cache: Optional[str] = None, cache_threshold: Optional[float] = None,
                 guidance_interval: Optional[Sequence[float]] = None) -> CMDPipelineOutput:
        r"""Generate ``len(prompt) * num_videos_per_prompt * motion_variations`` videos.

        Every argument is checked before any network runs (:meth:`check_inputs`, then :meth:`run`); a bad
        one is a one-line ``ValueError`` (or ``TypeError`` for an image of the wrong type) naming it.

        Args:
            prompt (`str` or `List[str]`):
                The text of each video.
            negative_prompt (`str` or `List[str]`, *optional*):
                What the content frame should not show: the unconditional half of the content UNet's
                classifier-free guidance (default: the empty prompt). One, or one per prompt.
            num_frames (`int`, *optional*), height (`int`, *optional*), width (`int`, *optional*):
                The clip size in pixels, default the model's own (``config.num_frames`` x ``height`` x
                ``width``): a size the model serves (``config.sizes``), or fewer frames than one has (its
                first frames are returned).
            num_inference_steps (`int`, *optional*):
                Denoising steps of the content UNet, 1 to its training timesteps (default
                ``config.sampling.steps``).
            motion_steps (`int`, *optional*):
                Denoising steps of the motion DiT (default ``config.sampling.motion_steps``, else
                ``num_inference_steps``).
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale of the content UNet, >= 0; <= 1 runs the conditional branch
                alone (default ``config.sampling.guidance``).
            motion_guidance_scale (`float`, *optional*):
                Guidance scale of the motion DiT, on the text only (its unconditional half gets the learned
                null text and the same content frame; default ``config.sampling.motion_guidance``, else
                ``guidance_scale``).
            scheduler (`str`, *optional*):
                "ddim" or "dpm" (DPM-Solver++ 2M), :mod:`engine.schedulers` (default
                ``config.sampling.scheduler``).
            num_videos_per_prompt (`int`, defaults to 1):
                Videos per prompt, each with its own noise.
            generator (`int`, `torch.Generator` or `List[torch.Generator]`, *optional*):
                A seed (prompt i gets seed + i), one generator, or one per prompt. Noise is drawn on the CPU
                per prompt, so a prompt's video does not depend on its batch or the device.
            image (*optional*):
                Image-to-video: the image becomes the content frame (the content UNet does not run). Any form
                :meth:`image_pixels` takes (a path, a PIL image, an array or tensor; one, or one per prompt).
            motion_variations (`int`, defaults to 1):
                Motions per content frame (the content UNet runs once for all of them).
            output_type (`str`, defaults to "np"):
                "np": ``frames`` (B, L, H, W, 3) float32 numpy in [0, 1]; "pt": (B, L, 3, H, W) torch in [0, 1];
                "latent": no decode, ``frames`` is None.
            callback_on_step_end (`Callable`, *optional*):
                ``callback_on_step_end(pipe, step, timestep, kwargs)`` after each step of both loops with
                ``kwargs = {"stage", "latents", "num_steps"}``; a returned dict with "latents" replaces them.
            progress (`bool`, defaults to True):
                A progress bar per denoising loop.
            cache (`str`, *optional*):
                Fewer denoiser evaluations (:mod:`engine.cache`): "static" follows the model's calibrated
                reuse schedule (any backend); "dynamic" skips a video's step when its first-block output
                changed less than ``cache_threshold`` (eager and compile backends). None: every step runs.
            cache_threshold (`float`, *optional*):
                With "static", derive the schedule at this threshold; with "dynamic", the relative change
                below which a step is skipped (default: the model's calibrated one).
            guidance_interval (`Tuple[float, float]`, *optional*):
                ``(start, end)``: CFG only on the steps starting in that fraction of each loop, the
                conditional half alone elsewhere.

        Returns:
            [`CMDPipelineOutput`]: ``frames``, the ``content`` and ``motion`` latents, ``timings`` (seconds
            per stage), ``prompts`` and ``evaluations`` (what the denoisers ran). Batch order: prompt, then
            video of that prompt, then motion variation.
        """
        _check_output_type(output_type)
        prompts = _prompt_list("prompt", prompt)
        req = self.check_inputs(len(prompts), image is not None, output_type, num_frames=num_frames, height=height,
                                width=width, num_inference_steps=num_inference_steps, motion_steps=motion_steps,
                                guidance_scale=guidance_scale, motion_guidance_scale=motion_guidance_scale,
                                scheduler=scheduler, num_videos_per_prompt=num_videos_per_prompt,
                                motion_variations=motion_variations, cache=cache, cache_threshold=cache_threshold,
                                guidance_interval=guidance_interval)
        return self._generate(req, prompts, negative_prompt, generator, image, output_type, callback_on_step_end,
                              progress)

    @torch.no_grad()
    def run(self, request: Request, prompt: Union[str, List[str]], negative_prompt: Union[None, str, List[str]] = None,
            generator: Generator = None, image=None, output_type: str = "np",
            callback_on_step_end: Optional[Callable] = None, progress: bool = True) -> CMDPipelineOutput:
        """Generate the videos of a validated ``request`` (:func:`engine.request.check_request` against this
        pipeline's config, or :meth:`check_inputs`) for ``prompt``: what a CLI or a benchmark validates once
        and runs many times. The other arguments are :meth:`__call__`'s; ``image`` must be given exactly
        when the request is ``image_to_video``. Checks, before any network runs, only what the request cannot
        know: the prompts, image and generator, and this backend (:meth:`check_backend`)."""
        if not isinstance(request, Request):
            raise TypeError(f"request must be an engine.request.Request (check_request), got {type(request).__name__}")
        prompts = _prompt_list("prompt", prompt)
        if (image is not None) != request.image_to_video:
            raise ValueError(f"the request was checked for {'image' if request.image_to_video else 'text'}-to-video "
                             f"(image_to_video={request.image_to_video}), but image is "
                             f"{'missing' if image is None else 'given'}")
        self.check_backend(request, len(prompts), output_type)
        return self._generate(request, prompts, negative_prompt, generator, image, output_type, callback_on_step_end,
                              progress)

    def _generate(self, *args) -> CMDPipelineOutput:
        """:meth:`_generate_now`, on the CPU with the threads the machine has free now (engine/cpu.py)."""
        if self.device.type != "cpu":
            return self._generate_now(*args)
        from engine.cpu import cpu_threads

        with cpu_threads():
            return self._generate_now(*args)

    def _generate_now(self, req: Request, prompts: List[str], negative_prompt, generator: Generator, image,
                      output_type: str, callback_on_step_end: Optional[Callable], progress: bool) -> CMDPipelineOutput:
        """The generation of a checked request; the per-call inputs (image, generators, negative prompts) are
        checked first."""
        pixels = self.image_pixels(image, req.height, req.width, len(prompts)) if image is not None else None
        gens = _generators(generator, len(prompts))
        need_negative = image is None and req.guidance > 1.0
        negatives = _prompt_list("negative_prompt", negative_prompt or "", len(prompts)) if need_negative else None

        v, m = req.num_videos, req.motion_variations
        content_noise, motion_noise = _initial_noise(req, gens)

        timer = StageTimer(self.device)
        counts = {"content": Evaluations(), "motion": Evaluations()}
        with timer.stage("text"):
            states, pooled, negative = self.encode_prompt(prompts, negatives)
            states, pooled = states.repeat_interleave(v, 0), pooled.repeat_interleave(v, 0)
            negative = negative.repeat_interleave(v, 0) if negative is not None else None
        with timer.stage("content"):
            if image is not None:
                content = self.encode_image(pixels).repeat_interleave(v, 0)
            else:
                content = self.generate_content(states, negative, content_noise, req.steps, req.guidance,
                                                 req.scheduler, callback_on_step_end, progress, req.cache_plan.content,
                                                 counts["content"])
        with timer.stage("motion"):
            motion = self.generate_motion(content.repeat_interleave(m, 0), pooled.repeat_interleave(m, 0),
                                          motion_noise, req.motion_steps, req.motion_guidance, req.scheduler,
                                          callback_on_step_end, progress, req.cache_plan.motion, counts["motion"])
        content = content.repeat_interleave(m, 0)
        frames = None
        if output_type != "latent":
            video = self.decode_latents(content, motion, timer)[:, : req.num_frames]
            video = ((video + 1) / 2).clamp(0, 1)
            frames = video if output_type == "pt" else video.permute(0, 1, 3, 4, 2).cpu().numpy()
        names = [p for p in prompts for _ in range(v * m)]
        evaluations = {}
        for stage, count in counts.items():
            evaluations[stage] = count.full
            evaluations[f"{stage}_first_block"] = count.first_block
        return CMDPipelineOutput(frames, content, motion, timer.result(), names, evaluations)
