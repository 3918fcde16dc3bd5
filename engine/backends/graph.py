"""The base of the backends that run exported graphs: ``onnxruntime`` (sessions over an export folder)
and ``tensorrt`` (engines from a plan folder).

Both hold the network declarations their folder was built from (:mod:`engine.networks`, read through
:mod:`engine.artefacts`), open one runtime per network on first use, check a request's network calls
against the graphs' shape buckets and batch ranges before anything runs, and map the five network calls
of :class:`engine.backends.base.Backend` onto runs of the graph of that name. A subclass says how a graph
opens (:meth:`GraphBackend.open`): the opened runtime is called with torch tensors in declaration order
and returns the outputs in declaration order.
"""

from typing import Callable, Dict, List, Optional, Sequence

import torch

from engine.backends.base import Backend
from engine.networks import Network, NetworkCall, check_calls

Runtime = Callable[..., List[torch.Tensor]]


class GraphBackend(Backend):
    """A subclass opens its folder in ``__init__`` and hands it over with :meth:`attach`: the folder, the
    declarations of the graphs it can run (by name) and what messages call them ("graphs", "plans")."""

    # True: a runtime hands back static buffers it overwrites on its next run (TensorRT); the decoders'
    # outputs, which the pipeline keeps, are then copied.
    outputs_reused = False
    required = ("content_unet", "motion_dit", "ae_decoder")  # the graphs every request needs

    def __init__(self, model, device=None, dtype=None):
        super().__init__(model, device, dtype)
        self.folder: Optional[str] = None
        self.networks: Dict[str, Network] = {}
        self.source = "no graphs"
        self.reset()

    def attach(self, folder: str, networks: Dict[str, Network], what: str = "graphs") -> None:
        """Run the graphs of ``folder``, declared by ``networks``."""
        self.folder = folder
        self.networks = networks
        self.source = f"the {what} in {folder!r}"
        self.reset()

    def open(self, name: str) -> Runtime:
        """The runtime of network ``name`` (declared in :attr:`networks`)."""
        raise NotImplementedError

    def check_required(self, remedy: str) -> None:
        """A one-line ValueError at construction when the folder lacks a graph every request needs."""
        missing = [n for n in self.required if n not in self.networks]
        if missing:
            raise ValueError(f"{self.source} lack the {', '.join(missing)} graph(s); {remedy}")

    def reset(self) -> None:
        self._sessions: Dict[str, Runtime] = {}

    def session(self, name: str) -> Runtime:
        """The runtime of one network, opened on first use and kept."""
        if name not in self._sessions:
            if name not in self.networks:
                raise ValueError(f"{self.source} hold no {name} graph")
            self._sessions[name] = self.open(name)
        return self._sessions[name]

    def check_calls(self, calls: Sequence[NetworkCall]) -> None:
        """The graphs' shape buckets and batch ranges (from the folder's manifest), before anything runs."""
        check_calls(self.networks, calls, self.source)

    def _kept(self, output: torch.Tensor) -> torch.Tensor:
        return output.clone() if self.outputs_reused else output

    # -- the networks as graph runs ------------------------------------------------------------------
    def unet_step(self, sample, timestep, states):
        return self.session("content_unet")(sample, timestep, states)[0]

    def dit_step(self, motion, timestep, content, text):
        return self.session("motion_dit")(motion, timestep, content, text)[0]

    def decode(self, content, motion):
        return self._kept(self.session("ae_decoder")(content, motion)[0])

    def decode_frames(self, latents: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """Latent mode: scaled latents (B, L, c, h, w) -> RGB (B, L, 3, H, W) in [-1, 1] by the vae_decoder
        graph, ``chunk`` frames per run (default: the graph's largest batch), as the eager decode does."""
        from engine.models.vae import per_frame

        graph = self.session("vae_decoder")
        chunk = chunk or self.networks["vae_decoder"].batch_range()[2]
        return per_frame(lambda part: self._kept(graph(part)[0]), latents, chunk)
