"""CMD kernels: the three hot ops of the engine, each a PyTorch reference plus (later) a Triton kernel.

Every op takes ``impl="auto" | "triton" | "reference"``. ``auto`` picks Triton on CUDA tensors or when
``TRITON_INTERPRET=1``, the reference otherwise. The reference is the spec: the CPU path, ONNX export,
tests and benchmarks all use it. This package imports only torch (and triton); it knows nothing of models.
"""

from kernels.attention import modulated_layernorm, motion_attention
from kernels.content_frame import content_frame
from kernels.fusion import decoder_fusion

__all__ = ["content_frame", "motion_attention", "modulated_layernorm", "decoder_fusion"]
