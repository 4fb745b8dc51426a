"""onnxflex: post-training quantization for ONNX models with learned rounding."""
__version__ = "0.1.0"
