"""Choosing between the Triton kernel and the PyTorch reference of an op."""

import contextlib
import os
from typing import Iterator, Optional

import torch

from kernels._triton import FLOAT_DTYPES, INTERPRETED

IMPLS = ("auto", "triton", "reference")

_forced: Optional[str] = None  # what impl="auto" means inside ``force_impl``


@contextlib.contextmanager
def force_impl(impl: str) -> Iterator[None]:
    """Within the block, ops called with ``impl="auto"`` (as the models call them) resolve as ``impl``:
    A/B checks of a whole model (kernels against references), debugging. Not thread-local."""
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


def use_triton(impl: str, *tensors: torch.Tensor, op: str, available: bool = True) -> bool:
    """Resolve ``impl`` for these inputs. ``auto``: Triton on CUDA or under the interpreter, when the
    op has a Triton kernel (``available``) for these dtypes; meta tensors take the reference (shapes and
    FLOP counts come out of its plain ops). ``triton`` insists and raises if the kernel cannot run here."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto" and _forced is not None:
        impl = _forced
    if impl == "reference" or exporting():
        return False
    on_meta = any(t.device.type == "meta" for t in tensors)
    dtypes_ok = all(t.dtype in FLOAT_DTYPES for t in tensors)
    if impl == "triton":
        if not available:
            raise NotImplementedError(f"{op}: no Triton kernel yet; use impl='reference'")
        if not dtypes_ok:
            bad = sorted({str(t.dtype) for t in tensors if t.dtype not in FLOAT_DTYPES})
            raise TypeError(f"{op}: the Triton kernel takes float32, float16 or bfloat16, got {bad}")
        if not (on_meta or all(t.is_cuda for t in tensors) or interpreting()):
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(f"{op}: impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 set before "
                             f"importing kernels, got tensors on {devices}")
        return True
    if not available or on_meta or not dtypes_ok:  # e.g. float64 checks run the reference
        return False
    return all(t.is_cuda for t in tensors) or interpreting()
