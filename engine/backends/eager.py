"""The reference backend: the networks called as they are, in PyTorch."""

from engine.backends import register_backend
from engine.backends.base import Backend


@register_backend("eager")
class EagerBackend(Backend):
    """Plain PyTorch calls (the base class's own: the reference); the scheduler runs as diffusers' own
    ``step``. It also hands out the networks in pieces, for ``cache="dynamic"``."""

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
