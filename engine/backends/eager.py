"""The reference backend: the networks called as they are, in PyTorch."""

import torch

from engine.backends import register_backend
from engine.backends.base import Backend


@register_backend("eager")
class EagerBackend(Backend):
    """Plain PyTorch calls; the scheduler runs as diffusers' own ``step``."""

    def unet_step(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.model.content_unet(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]

    def dit_step(self, motion: torch.Tensor, timestep: torch.Tensor, content: torch.Tensor,
                 text: torch.Tensor) -> torch.Tensor:
        return self.model.motion_dit(motion, timestep, content, text)

    def decode(self, content: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        return self.model.autoencoder.decode(content, motion)
