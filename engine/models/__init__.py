"""The CMD networks and the bundle that holds one model's networks together.

The names below are imported on first use (PEP 562), so that importing one light submodule (e.g.
``engine.models.text``) does not import diffusers and every network: a command that refuses bad input
before loading a model (a backend without exported graphs, say) does so without paying for those imports.
"""

import importlib

_SOURCES = {
    "CMDAutoencoder": "engine.models.autoencoder",
    "CMDModel": "engine.models.bundle",
    "MotionDiT": "engine.models.motion_dit",
    "TextEncoder": "engine.models.text",
    "build_content_unet": "engine.models.content",
    "load_content_unet": "engine.models.content",
}

__all__ = ["CMDAutoencoder", "CMDModel", "MotionDiT", "TextEncoder", "build_content_unet", "load_content_unet"]


def __getattr__(name):
    if name in _SOURCES:
        value = getattr(importlib.import_module(_SOURCES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
