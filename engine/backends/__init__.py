"""Backends by name. Each lives in its own module, imported only when asked for, so that e.g. the
CUDA-graph or TensorRT code never loads on a machine that does not use it.

A backend module registers its class with the decorator::

    from engine.backends import register_backend
    from engine.backends.base import Backend

    @register_backend("onnxruntime")
    class OnnxRuntimeBackend(Backend): ...

and :data:`MODULES` maps the name to the module that :func:`get_backend` imports on first use.
"""

import importlib
from typing import Callable, Dict, Type

from engine.backends.base import Backend

# name -> module holding it (imported lazily by get_backend).
MODULES: Dict[str, str] = {
    "eager": "engine.backends.eager",
    "compile": "engine.backends.compiled",
    "cudagraph": "engine.backends.cudagraph",
    "onnxruntime": "engine.backends.onnxruntime",
    "tensorrt": "engine.backends.tensorrt",
}

_REGISTRY: Dict[str, Type[Backend]] = {}


def register_backend(name: str) -> Callable[[Type[Backend]], Type[Backend]]:
    """Class decorator: make ``cls`` available as ``get_backend(name)``."""

    def wrap(cls: Type[Backend]) -> Type[Backend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_backends():
    """Every backend name the engine knows (registered or importable on demand)."""
    return sorted(set(MODULES) | set(_REGISTRY))


def get_backend(name: str) -> Type[Backend]:
    """The backend class registered as ``name``; a one-line ValueError for unknown or missing ones."""
    if name not in _REGISTRY:
        module = MODULES.get(name)
        if module is None:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(available_backends())}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module exists but needs something missing: say what
                raise ValueError(f"backend {name!r} needs the package {e.name!r}, which is not installed") from None
            raise ValueError(f"backend {name!r} is not available in this version ({module} is missing)") from None
        if name not in _REGISTRY:
            raise ValueError(f"backend module {module} did not register {name!r}")
    return _REGISTRY[name]


def check_backend_ready(name: str, device, dtype, **options) -> Type[Backend]:
    """:func:`get_backend` and that backend's :meth:`~engine.backends.base.Backend.check_ready` on ``device``
    (a torch.device or its name) in ``dtype`` with backend ``options``: what it needs besides the weights
    (TensorRT, a CUDA device, exported graphs or plans), checked before any model loads. Every CLI's
    ``--backend`` / ``--backends`` and ``CMDPipeline.from_pretrained`` come here. Returns the class; a
    one-line ValueError otherwise."""
    import torch

    cls = get_backend(name)
    cls.check_ready(torch.device(device), dtype, **options)
    return cls


__all__ = ["Backend", "MODULES", "available_backends", "check_backend_ready", "get_backend", "register_backend"]
