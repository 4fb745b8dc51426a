"""onnxflex: post-training quantization for ONNX models with learned rounding.

    import onnxflex
    result = onnxflex.quantize("model.onnx", "calib.npz", onnxflex.QuantConfig(wbits=4))
    result.save("model.w4a8.onnx")

The API is imported on first use (PEP 562), so that ``onnxflex --help`` does not load onnx or torch.
"""
__version__ = "0.1.0"

_LAZY = {"quantize": "onnxflex.api", "QuantResult": "onnxflex.api", "QuantConfig": "onnxflex.config",
         "ImageFolder": "onnxflex.sources", "compare_models": "onnxflex.compare"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxflex' has no attribute {name!r}")


__all__ = ["quantize", "QuantResult", "QuantConfig", "ImageFolder", "compare_models", "__version__"]
