"""CMD kernels: the engine's hot ops, each a PyTorch reference plus Triton kernels, one module per op
in ``cmd_kernels/ops/``.

Every op takes ``impl="auto" | "triton" | "reference"``, resolved by one rule (``cmd_kernels._dispatch.use_triton``):
``auto`` picks Triton on CUDA tensors or when ``TRITON_INTERPRET=1``, the reference otherwise;
``force_impl(impl)`` overrides ``auto`` for a block. Each op is a ``torch.library`` custom op (``cmd::...``,
with a fake impl and autograd), so ``torch.compile`` and CUDA graphs see one op, while ONNX export traces
the reference. The reference is the spec: the CPU path, ONNX export, tests and benchmarks all use it
(``cmd_kernels.testing`` holds the tolerances and input makers of the tests and the benchmark). This package
imports only torch and triton; it knows nothing of models. ``python -m cmd_kernels.bench`` benchmarks the
kernels; ``python -m cmd_kernels.aot`` compiles and checks them for sm_80/sm_90 without a GPU (and fills a
Triton cache).
"""

from cmd_kernels._dispatch import force_impl
from cmd_kernels.ops.content_frame import content_frame
from cmd_kernels.ops.decoder_fusion import decoder_fusion
from cmd_kernels.ops.modulated_layernorm import modulated_layernorm
from cmd_kernels.ops.motion_attention import motion_attention

__all__ = ["content_frame", "motion_attention", "modulated_layernorm", "decoder_fusion", "force_impl"]
