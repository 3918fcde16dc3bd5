"""The backend interface: one call per network of :mod:`engine.networks`, eager PyTorch by default.

A backend owns *how* the networks run (eager PyTorch, torch.compile, CUDA graphs, ONNX Runtime,
TensorRT); the pipeline owns *what* runs (text encoding, classifier-free-guidance batches, scheduler
loops, writing). The five networks are the contract; every call has an eager default here, so a backend
overrides the networks it runs differently, and every backend must match the defaults within tolerance::

    text_encoder    text_encoder() -> a TextEncoder this backend runs, or None (the pipeline's own)
    content_unet    unet_step(sample (N, C, H, W), timestep (N,), states (N, T, d_txt)) -> output (N, C, H, W)
    motion_dit      dit_step(motion (N, D, L, H'+W'), timestep (N,), content (N, C, H, W), text (N, d_txt))
                        -> output (N, D, L, H'+W')
    ae_decoder      decode(content (B, C, H, W), motion (B, D, L, H'+W')) -> video (B, L, C, H, W)
    vae_decoder     decode_frames(latents (B, L, c, h, w), chunk) -> RGB (B, L, 3, 8h, 8w) in [-1, 1]
                        (latent mode: the image VAE, ``chunk`` frames per call)

The pipeline builds the CFG batch itself, N = 2B, conditional half first:
- UNet: ``sample = [x ; x]``, ``states = [prompt states ; negative-prompt states]``;
- DiT: ``motion = [z ; z]``, ``content = [xbar ; xbar]`` (the content frame is kept in both halves),
  ``text = [pooled ; model.motion_dit.null_text expanded]``.
Inputs arrive in the backend's ``dtype`` on its ``device``; outputs come back in any float dtype on
that device (the pipeline upcasts). A denoiser output may be a buffer the backend reuses on its next
call: callers consume it before calling again (decoded videos are the caller's to keep).

Before a request runs, the pipeline hands ``check_calls`` the size and batch of every network call it
will make, so that a backend with fixed limits (exported graphs' shape buckets and batch profiles) refuses
it before any work. Backends register by name with :func:`engine.backends.register_backend`, and ``device_scheduler``
tells the pipeline to run the scheduler as device tables (no host syncs) instead of diffusers' step.
The graph backends (onnxruntime, tensorrt) share :class:`engine.backends.graph.GraphBackend`.

Step caching (:mod:`engine.cache`): ``cache_modes`` lists the modes a backend runs. "static" needs
nothing of it (the pipeline calls the networks on fewer steps, and with a batch of B instead of 2B where
the guidance interval turns CFG off: the batch axis of every backend is dynamic); "dynamic" needs
``network_parts(kind)``, the networks in pieces, so the eager backends (eager, compile) have it and the
graph backends (cudagraph, onnxruntime, tensorrt) do not.
"""

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch

if TYPE_CHECKING:  # the models import diffusers: only type checkers need them here
    from engine.models.bundle import CMDModel
    from engine.models.text import TextEncoder
    from engine.networks import NetworkCall


class Backend:
    """Base class: holds the model, its device and dtype, and runs each network eagerly; subclasses
    override the calls of the networks they run otherwise."""

    name = "base"
    # True: the pipeline runs the scheduler arithmetic as device tables (engine.schedulers.DeviceSampler).
    device_scheduler = False
    # engine.cache modes this backend runs; "dynamic" needs network_parts.
    cache_modes = ("static",)

    def __init__(self, model: "CMDModel", device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        self.model = model
        first = next(model.content_unet.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype

    @classmethod
    def check_ready(cls, device: torch.device, dtype: torch.dtype, **options) -> None:
        """What this backend needs besides the model's weights (a package, a kind of device, exported graphs
        or plans), checked before any model loads (:func:`engine.backends.check_backend_ready`): a one-line
        ValueError naming what is missing and how to get it. ``options``: the constructor's backend options
        (others ignored). The PyTorch backends on a CPU or GPU need nothing."""

    # -- the five networks -------------------------------------------------------------------------
    def text_encoder(self) -> Optional["TextEncoder"]:
        """The text encoder this backend runs itself (onnxruntime: the exported graph with its saved
        tokenizer), which the pipeline then uses instead of its own; None: the pipeline's PyTorch one."""
        return None

    def unet_step(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """One content-UNet evaluation (the model output: epsilon or v, as the config trains it)."""
        return self.model.content_unet(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]

    def dit_step(self, motion: torch.Tensor, timestep: torch.Tensor, content: torch.Tensor,
                 text: torch.Tensor) -> torch.Tensor:
        """One motion-DiT evaluation."""
        return self.model.motion_dit(motion, timestep, content, text)

    def decode(self, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """The CMD autoencoder's decoder: frames (pixels, or VAE latents in latent mode)."""
        return self.model.autoencoder.decode(content, motion)

    def decode_frames(self, latents: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """Latent mode: the image VAE's decoder on every frame, ``chunk`` frames per call (default
        ``engine.models.vae.VAE_CHUNK``; :func:`engine.models.vae.decode_frames`)."""
        from engine.models import vae

        return vae.decode_frames(self.model.vae, latents, chunk=chunk or vae.VAE_CHUNK)

    # -- limits, caching, state ----------------------------------------------------------------------
    def network_parts(self, kind: str):
        """``kind`` "unet" or "dit": the network in pieces (:class:`engine.cache.UNetParts`,
        :class:`engine.cache.DiTParts`) for ``cache="dynamic"``; backends that run whole graphs have none."""
        raise ValueError(f"backend {self.name!r} runs whole networks: cache='dynamic' needs eager or compile")

    def check_calls(self, calls: Sequence["NetworkCall"]) -> None:
        """Refuse, before anything runs, a request whose network calls (:class:`engine.networks.NetworkCall`:
        clip size and batch per network) this backend cannot run, with a one-line ValueError. Backends
        of exported graphs check their shape buckets and batch ranges; PyTorch backends run any size."""

    def reset(self) -> None:
        """Drop anything cached from the weights (compiled graphs, captured CUDA graphs). Call it after
        replacing parameters (e.g. loading other weights), which cached graphs would not see."""

    def update_weights(self, changed: Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Weights of the model were rewritten in place (adapters: :mod:`engine.adapters`); ``changed`` maps a
        network ("content_unet", "motion_dit", "autoencoder") to its parameters written: name -> (the base
        value, the parameter now). The
        PyTorch backends run the model's own parameters (same storage, so compiled code and captured CUDA
        graphs see the new values) and need nothing; backends with their own copy of the weights refresh it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype})"
