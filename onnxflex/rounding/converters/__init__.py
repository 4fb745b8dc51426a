"""ONNX → torch op converters. Importing this package registers every converter."""
from onnxflex.rounding.converters.registry import OpNode, converter, find_converter, numpy_value, supported_ops
from onnxflex.rounding.converters import (  # noqa: F401  (registration)
    channel_norm, contrib, elementwise, nn, recurrent, shape)

__all__ = ["OpNode", "converter", "find_converter", "numpy_value", "supported_ops"]
