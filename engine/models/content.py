"""Stage 2a: the content-frame model, a diffusers UNet2DConditionModel (DESIGN 3.2).

Small configs build it from scratch from the config's ``content_unet`` kwargs; at SD scale it is
fine-tuned from the UNet of a local Stable Diffusion folder (diffusers layout)."""

import os
from typing import Any, Dict

from diffusers import UNet2DConditionModel

from engine.logs import quiet_loading
from engine.model_folder import check_network_weights, find_network_folder, network_tensors


def build_content_unet(unet_kwargs: Dict[str, Any]) -> UNet2DConditionModel:
    """A randomly initialised UNet from the config's kwargs (build under ``torch.device('meta')`` for
    shape and FLOP work without memory)."""
    return UNet2DConditionModel(**unet_kwargs)


def find_content_unet(path: str):
    """Where :func:`load_content_unet` finds the network in ``path``: ``(subfolder or None, safetensors)``; a
    one-line ValueError naming the folder and a missing or truncated file (for checking before any weights
    load)."""
    return find_network_folder(path, "unet", "Stable Diffusion folder")


@quiet_loading("diffusers")
def load_content_unet(path: str) -> UNet2DConditionModel:
    """The UNet of a local Stable Diffusion folder (``path/unet``) or a bare UNet folder."""
    # Its files first (one line naming a missing or truncated one, not diffusers' error lines), and the
    # format found, so that diffusers does not log an error looking for safetensors in a .bin folder.
    sub, safetensors = find_content_unet(path)
    if safetensors:  # a Stable Diffusion folder's names may be older ones diffusers renames: names not checked
        folder = os.path.join(path, sub or "")
        check_network_weights(folder, network_tensors(UNet2DConditionModel, folder), f"{folder!r}: ", keys=False)
    try:
        return UNet2DConditionModel.from_pretrained(path, subfolder=sub, use_safetensors=safetensors)
    except Exception as e:  # diffusers raises many kinds; say which folder is bad
        raise ValueError(f"cannot load {os.path.join(path, sub or '')!r}: {str(e).splitlines()[0]}") from None
