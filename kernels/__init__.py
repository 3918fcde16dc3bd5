"""CMD kernels: the three hot op families of the engine, each a PyTorch reference plus Triton kernels.

Every op takes ``impl="auto" | "triton" | "reference"``. ``auto`` picks Triton on CUDA tensors or when
``TRITON_INTERPRET=1``, the reference otherwise; ``force_impl(impl)`` overrides ``auto`` for a block.
Each op is a ``torch.library`` custom op (``cmd::...``, with a fake impl and autograd), so
``torch.compile`` and CUDA graphs see one op, while ONNX export traces the reference. The reference is
the spec: the CPU path, ONNX export, tests and benchmarks all use it. This package imports only torch
and triton; it knows nothing of models. ``python -m kernels.bench`` benchmarks the kernels;
``python -m kernels.aot`` compiles and checks them for sm_80/sm_90 without a GPU (and fills a Triton cache).
"""

from kernels._dispatch import force_impl
from kernels.attention import modulated_layernorm, motion_attention
from kernels.content_frame import content_frame
from kernels.fusion import decoder_fusion

__all__ = ["content_frame", "motion_attention", "modulated_layernorm", "decoder_fusion", "force_impl"]
