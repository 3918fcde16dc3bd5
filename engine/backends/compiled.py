"""``compile``: the two denoisers (and optionally the AE decoder) through ``torch.compile``.

Compilation happens on the first call of each network and again for each new input shape
(``dynamic=False``: a video engine sees few shapes, and static shapes give the best kernels).
Compiled modules are cached on the backend, so one pipeline compiles once."""

from typing import Optional

import torch

from engine.backends import register_backend
from engine.backends.eager import EagerBackend


@register_backend("compile")
class CompiledBackend(EagerBackend):
    """``mode``: a torch.compile mode (None = default; "max-autotune-no-cudagraphs" on GPUs);
    ``compile_decoder``: also compile the AE decoder (it runs once per video, so off by default)."""

    def __init__(self, model, device=None, dtype=None, mode: Optional[str] = None, compile_decoder: bool = False):
        super().__init__(model, device, dtype)
        self.mode = mode
        self.compile_decoder = compile_decoder
        self.reset()

    def reset(self) -> None:
        self._parts = {}
        opts = dict(mode=self.mode, dynamic=False)
        self._unet = torch.compile(self.model.content_unet, **opts)
        self._dit = torch.compile(self.model.motion_dit, **opts)
        self._decode = torch.compile(self.model.autoencoder.decode, **opts) if self.compile_decoder else None

    def _wrap_part(self):
        # Dynamic caching runs the rest of a network on the videos that need it: the batch varies, so
        # inductor may make it a dynamic axis (after its first recompile) instead of one graph per size.
        return lambda fn: torch.compile(fn, mode=self.mode, dynamic=None)

    def unet_step(self, sample, timestep, states):
        return self._unet(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]

    def dit_step(self, motion, timestep, content, text):
        return self._dit(motion, timestep, content, text)

    def decode(self, content, motion):
        if self._decode is None:
            return super().decode(content, motion)
        return self._decode(content, motion)
