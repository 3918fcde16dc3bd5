"""Stage 2a: the content-frame model, a diffusers UNet2DConditionModel (DESIGN 3.2).

Small configs build it from scratch from the config's ``content_unet`` kwargs; at SD scale it is
fine-tuned from the UNet of a local Stable Diffusion folder (diffusers layout)."""

import os
from typing import Any, Dict

from diffusers import UNet2DConditionModel

from engine.logs import quiet_loading


def build_content_unet(unet_kwargs: Dict[str, Any]) -> UNet2DConditionModel:
    """A randomly initialised UNet from the config's kwargs (build under ``torch.device('meta')`` for
    shape and FLOP work without memory)."""
    return UNet2DConditionModel(**unet_kwargs)


@quiet_loading("diffusers")
def load_content_unet(path: str) -> UNet2DConditionModel:
    """The UNet of a local Stable Diffusion folder (``path/unet``) or a bare UNet folder."""
    if not os.path.isdir(path):
        raise ValueError(f"Stable Diffusion folder not found: {path!r}")
    sub = "unet" if os.path.isdir(os.path.join(path, "unet")) else None
    return UNet2DConditionModel.from_pretrained(path, subfolder=sub)
