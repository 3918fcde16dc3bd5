"""Export of CMD networks to ONNX and TensorRT plans (imports engine; nothing imports it)."""
