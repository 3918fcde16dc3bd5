"""Choosing between the Triton kernel and the PyTorch reference of an op."""

import os

import torch

IMPLS = ("auto", "triton", "reference")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def exporting() -> bool:
    """True while torch.onnx / torch.export traces: graphs must hold the reference decomposition."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def use_triton(impl: str, *tensors: torch.Tensor, op: str, available: bool = True) -> bool:
    """Resolve ``impl`` for these inputs. ``auto``: Triton on CUDA or under the interpreter, when the
    op has a Triton kernel (``available``); ``triton`` insists and raises if there is none."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference" or exporting():
        return False
    if impl == "triton":
        if not available:
            raise NotImplementedError(f"{op}: no Triton kernel yet; use impl='reference'")
        return True
    return available and (all(t.is_cuda for t in tensors) or interpreting())
