"""The one rule choosing between an op's Triton kernel and its PyTorch reference.

Every public op calls :func:`use_triton` once, before any work, and then runs either its custom op
(whose body always launches the kernel) or its reference; nothing else decides. ``force_impl`` changes
what ``impl="auto"`` means for a block (A/B checks of whole models).
"""

import contextlib
import os
from typing import Iterator, Optional

import torch

from cmd_kernels._triton import FLOAT_DTYPES, INTERPRETED

IMPLS = ("auto", "triton", "reference")

_forced: Optional[str] = None  # what impl="auto" means inside ``force_impl``


@contextlib.contextmanager
def force_impl(impl: str) -> Iterator[None]:
    """Within the block, ops called with ``impl="auto"`` (as the models call them) resolve as ``impl``:
    A/B checks of a whole model (kernels against references), debugging. Not thread-local. Raises
    ``ValueError`` for an ``impl`` not in ``IMPLS``."""
    global _forced
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    previous, _forced = _forced, (None if impl == "auto" else impl)
    try:
        yield
    finally:
        _forced = previous


def interpreting() -> bool:
    """True when Triton runs our kernels in its CPU interpreter: ``TRITON_INTERPRET=1`` now *and* when
    the kernels were decorated (``triton.jit`` reads the variable once, at import)."""
    return INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") == "1"


def exporting() -> bool:
    """True while torch.onnx / torch.export traces: graphs must hold the reference decomposition."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def launchable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these (non-meta) tensors' devices: all on CUDA, or any device
    while the kernels run in the interpreter (:func:`interpreting`)."""
    return all(t.is_cuda for t in tensors) or interpreting()


def use_triton(impl: str, *tensors: torch.Tensor, op: str) -> bool:
    """Resolve ``impl`` for an op's input tensors: True to run the Triton kernel, False for the reference.

    ``"reference"``, or any call while exporting: the reference. ``"auto"`` (or what ``force_impl`` set):
    the kernel when every tensor is fp32/fp16/bf16 and :func:`launchable`, else the reference (fp64 checks,
    CPU without the interpreter); meta tensors take the reference, whose plain ops give shapes and FLOP
    counts. ``"triton"`` insists: meta tensors go to the custom op's fake impl, and it raises
    ``TypeError`` for other dtypes, ``ValueError`` for tensors it cannot launch on. ``ValueError`` for an
    ``impl`` not in ``IMPLS``. ``op`` names the op in the errors."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto" and _forced is not None:
        impl = _forced
    if impl == "reference" or exporting():
        return False
    on_meta = any(t.device.type == "meta" for t in tensors)
    dtypes_ok = all(t.dtype in FLOAT_DTYPES for t in tensors)
    if impl == "auto":
        return dtypes_ok and not on_meta and launchable(*tensors)
    if not dtypes_ok:
        bad = sorted({str(t.dtype) for t in tensors if t.dtype not in FLOAT_DTYPES})
        raise TypeError(f"{op}: the Triton kernel takes float32, float16 or bfloat16, got {bad}")
    if not (on_meta or launchable(*tensors)):
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(f"{op}: impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 set before "
                         f"importing kernels, got tensors on {devices}")
    return True
