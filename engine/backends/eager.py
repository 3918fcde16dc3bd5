"""The reference backend: the networks called as they are, in PyTorch."""

import torch

from engine.backends import register_backend
from engine.backends.base import Backend


@register_backend("eager")
class EagerBackend(Backend):
    """Plain PyTorch calls; the scheduler runs as diffusers' own ``step``."""

    cache_modes = ("static", "dynamic")

    def network_parts(self, kind: str):
        """The UNet ("unet") or DiT ("dit") in pieces for ``cache="dynamic"``, built once per backend."""
        from engine.cache import DiTParts, UNetParts

        parts = self.__dict__.setdefault("_parts", {})
        if kind not in parts:
            if kind not in ("unet", "dit"):
                raise ValueError(f"kind must be 'unet' or 'dit', got {kind!r}")
            wrap = self._wrap_part()
            parts[kind] = (UNetParts(self.model.content_unet, wrap) if kind == "unet"
                           else DiTParts(self.model.motion_dit, wrap))
        return parts[kind]

    def _wrap_part(self):
        """How each piece runs: as it is (eager); ``compile`` compiles it."""
        return None

    def unet_step(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.model.content_unet(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]

    def dit_step(self, motion: torch.Tensor, timestep: torch.Tensor, content: torch.Tensor,
                 text: torch.Tensor) -> torch.Tensor:
        return self.model.motion_dit(motion, timestep, content, text)

    def decode(self, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        return self.model.autoencoder.decode(content, motion)
