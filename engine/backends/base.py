"""The backend interface: the three calls the pipeline makes into the networks.

A backend owns *how* the networks run (eager PyTorch, torch.compile, CUDA graphs, ONNX Runtime,
TensorRT); the pipeline owns *what* runs (text encoding, classifier-free-guidance batches, scheduler
loops, VAE decoding, writing). Every backend takes the same inputs and must match ``eager`` within
tolerance::

    unet_step(sample (N, C, H, W), timestep (N,) long, states (N, T, d_txt)) -> model output (N, C, H, W)
    dit_step(motion (N, D, L, H'+W'), timestep (N,) long, content (N, C, H, W), text (N, d_txt))
        -> model output (N, D, L, H'+W')
    decode(content (B, C, H, W), motion (B, D, L, H'+W')) -> video (B, L, C, H, W)

The pipeline builds the CFG batch itself, N = 2B, conditional half first:
- UNet: ``sample = [x ; x]``, ``states = [prompt states ; negative-prompt states]``;
- DiT: ``motion = [z ; z]``, ``content = [xbar ; xbar]`` (the content frame is kept in both halves),
  ``text = [pooled ; model.motion_dit.null_text expanded]``.
Inputs arrive in the backend's ``dtype`` on its ``device``; outputs come back in any float dtype on
that device (the pipeline upcasts). An output may be a buffer the backend reuses on its next call:
callers consume it before calling again.

Before a request runs, the pipeline hands ``check_calls`` the size and batch of every network call it
will make, so that a backend with fixed limits (exported graphs' shape buckets and batch profiles) refuses
it before any work. Backends register by name with :func:`engine.backends.register_backend`, and ``device_scheduler``
tells the pipeline to run the scheduler as device tables (no host syncs) instead of diffusers' step.

Step caching (:mod:`engine.cache`): ``cache_modes`` lists the modes a backend runs. "static" needs
nothing of it (the pipeline calls the networks on fewer steps, and with a batch of B instead of 2B where
the guidance interval turns CFG off: the batch axis of every backend is dynamic); "dynamic" needs
``network_parts(kind)``, the networks in pieces, so the eager backends (eager, compile) have it and the
graph backends (cudagraph, onnxruntime, tensorrt) do not.
"""

from typing import TYPE_CHECKING, Optional, Sequence

import torch

if TYPE_CHECKING:  # the models import diffusers: only type checkers need them here
    from engine.models.bundle import CMDModel
    from engine.networks import NetworkCall


class Backend:
    """Base class: holds the model, its device and dtype. Subclasses implement the three calls."""

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

    def unet_step(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dit_step(self, motion: torch.Tensor, timestep: torch.Tensor, content: torch.Tensor,
                 text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype})"
