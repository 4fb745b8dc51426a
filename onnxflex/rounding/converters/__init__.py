"""ONNX → torch op converters. Importing this package registers every converter."""
from onnxflex.rounding.converters.registry import OpNode, converter, find_converter, numpy_value, supported_ops
from onnxflex.rounding.converters import channel_norm, contrib, elementwise, nn, recurrent, shape  # noqa: F401,E501  (registration)

__all__ = ["OpNode", "converter", "find_converter", "numpy_value", "supported_ops"]
