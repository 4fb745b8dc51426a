"""Every ONNX → torch converter against onnxruntime on a one-node model, plus registry behaviour.

Each case is (op, inputs, attributes, opset): the node runs in onnxruntime (CPU) and through
``find_converter(op, opset)`` on the same seeded inputs, and every output must match in dtype,
shape and value.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxflex.errors import RegistryError
from onnxflex.rounding.converters import OpNode, converter, find_converter, supported_ops

RNG = np.random.default_rng(0)
INT64_MAX, INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def pos(*shape: int) -> np.ndarray:
    """Positive floats, for Log, Sqrt, Reciprocal, Pow bases and variances."""
    return (RNG.random(shape) + 0.1).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def ints(*shape: int, high: int = 5) -> np.ndarray:
    return RNG.integers(-high, high, shape).astype(np.int64)


def bools(*shape: int) -> np.ndarray:
    return RNG.random(shape) > 0.5


def case(op: str, *inputs: np.ndarray | None, opset: int = 13, outputs: int = 1, tol: float = 1e-5,
         id: str = "", **attrs):
    """One parametrized case; ``None`` marks an omitted optional input."""
    return pytest.param(op, inputs, attrs, opset, outputs, tol, id=f"{op}{'-' + id if id else ''}@{opset}")


NN_CASES = [
    case("Conv", f32(1, 4, 8, 8), f32(6, 4, 3, 3), f32(6), id="pads1-bias", pads=[1, 1, 1, 1]),
    case("Conv", f32(2, 4, 9, 9), f32(6, 2, 3, 3), id="stride2-dil2-group2", strides=[2, 2], dilations=[2, 2],
         group=2),
    case("Conv", f32(1, 3, 7, 6), f32(5, 3, 3, 2), f32(5), id="asym-pads", pads=[0, 1, 2, 0]),
    case("Conv", f32(1, 3, 9, 8), f32(4, 3, 3, 3), id="same-upper-stride2", auto_pad="SAME_UPPER", strides=[2, 2]),
    case("Conv", f32(1, 3, 6, 6), f32(4, 3, 2, 2), id="same-lower", auto_pad="SAME_LOWER"),
    case("Conv", f32(1, 3, 6, 6), f32(4, 3, 3, 3), id="valid", auto_pad="VALID"),
    case("Conv", f32(1, 4, 7, 7), f32(4, 1, 3, 3), f32(4), id="depthwise", group=4, pads=[1, 1, 1, 1]),
    case("Conv", f32(2, 3, 10), f32(4, 3, 3), f32(4), id="1d", strides=[2], pads=[1, 0]),
    case("Conv", f32(1, 2, 5, 5, 5), f32(3, 2, 3, 3, 3), id="3d", pads=[1] * 6),
    case("ConvTranspose", f32(1, 4, 5, 5), f32(4, 3, 3, 3), f32(3), id="stride2-pads-outpad",
         strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    case("ConvTranspose", f32(1, 4, 5, 5), f32(4, 2, 3, 3), id="group2-dil2", group=2, dilations=[2, 2]),
    case("ConvTranspose", f32(1, 2, 4, 4), f32(2, 3, 3, 3), f32(3), id="asym-pads", strides=[2, 2], pads=[0, 1, 1, 0]),
    case("ConvTranspose", f32(1, 2, 4, 4), f32(2, 3, 3, 3), id="output-shape", strides=[2, 2], output_shape=[8, 9]),
    case("ConvTranspose", f32(1, 2, 4, 5), f32(2, 3, 4, 3), id="same-upper", strides=[2, 2], auto_pad="SAME_UPPER"),
    case("ConvTranspose", f32(1, 2, 4, 5), f32(2, 3, 4, 3), id="same-lower", strides=[2, 2], auto_pad="SAME_LOWER"),
    case("ConvTranspose", f32(2, 3, 6), f32(3, 2, 4), f32(2), id="1d", strides=[3], pads=[1, 2]),
    case("ConvTranspose", f32(1, 2, 3, 3), f32(2, 2, 1, 1), f32(2), id="output-shape-past-full", strides=[3, 3],
         output_shape=[8, 9]),
    case("ConvTranspose", f32(1, 2, 4, 4), f32(2, 2, 1, 1), id="same-never-grows", strides=[2, 2],
         auto_pad="SAME_LOWER"),
    case("Gemm", f32(3, 5), f32(4, 5), f32(4), id="transB-bias", transB=1),
    case("Gemm", f32(5, 3), f32(5, 4), f32(1, 4), id="alpha-beta-transA", alpha=0.5, beta=2.0, transA=1),
    case("Gemm", f32(3, 5), f32(5, 4), None, id="no-C", opset=11),
    case("MatMul", f32(2, 3, 4), f32(4, 5), id="3d-2d"),
    case("MatMul", f32(2, 1, 3, 4), f32(3, 4, 5), id="batch-broadcast"),
    case("MatMul", f32(4), f32(2, 4, 3), id="1d"),
    case("MaxPool", f32(1, 3, 8, 8), id="k2s2", kernel_shape=[2, 2], strides=[2, 2]),
    case("MaxPool", f32(1, 3, 9, 9), id="pads-ceil", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
         ceil_mode=1),
    case("MaxPool", f32(1, 2, 9, 8), id="asym-pads-dil", kernel_shape=[3, 2], pads=[0, 1, 2, 0], dilations=[2, 1]),
    case("MaxPool", f32(1, 2, 7, 7), id="same-upper", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    case("MaxPool", f32(2, 3, 11), id="1d", kernel_shape=[3], strides=[2]),
    # onnxruntime drops a last ceil-mode window that would start in the end pad.
    case("MaxPool", f32(1, 2, 8, 7), id="ceil-asym-pads", kernel_shape=[3, 3], strides=[3, 3], pads=[1, 1, 2, 0],
         ceil_mode=1),
    # onnxruntime sizes SAME pads of pools from the undilated kernel.
    case("MaxPool", f32(1, 2, 6, 9), id="same-dilated", kernel_shape=[3, 2], strides=[2, 2], dilations=[2, 1],
         auto_pad="SAME_UPPER"),
    case("AveragePool", f32(1, 3, 8, 8), id="pads-exclude", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    case("AveragePool", f32(1, 3, 8, 8), id="pads-include", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
         count_include_pad=1),
    case("AveragePool", f32(1, 2, 9, 9), id="ceil", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    case("AveragePool", f32(1, 2, 7, 8), id="asym-exclude", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 2, 1]),
    case("AveragePool", f32(1, 2, 7, 8), id="asym-include", kernel_shape=[3, 3], pads=[0, 1, 2, 1],
         count_include_pad=1),
    case("AveragePool", f32(1, 2, 7, 7), id="same-lower", kernel_shape=[2, 2], auto_pad="SAME_LOWER"),
    case("AveragePool", f32(1, 2, 5, 5), id="ceil-asym-include", kernel_shape=[3, 3], strides=[3, 3],
         pads=[2, 0, 0, 2], ceil_mode=1, count_include_pad=1, opset=19),
    case("AveragePool", f32(2, 3, 9), id="1d-asym-ceil", kernel_shape=[2], strides=[2], pads=[1, 0], ceil_mode=1),
    case("GlobalAveragePool", f32(2, 3, 5, 4)),
    case("GlobalMaxPool", f32(2, 3, 5, 4)),
    case("Softmax", f32(2, 3, 4, 5), id="default-axis", opset=11),
    case("Softmax", f32(2, 3, 4, 5), id="axis2", axis=2, opset=11),
    case("Softmax", f32(2, 3, 4, 1), id="axis1-flattens", axis=1, opset=9),
    case("Softmax", f32(2, 3, 4, 5), id="default-axis"),
    case("Softmax", f32(2, 3, 4, 5), id="axis1", axis=1),
    case("LogSoftmax", f32(2, 3, 4), id="axis-neg2", axis=-2, opset=11),
    case("LogSoftmax", f32(2, 3, 4), id="default-axis"),
    case("BatchNormalization", f32(2, 3, 4, 4), f32(3), f32(3), f32(3), pos(3), epsilon=1e-3),
    case("LRN", f32(2, 7, 5, 5) * 3, id="alexnet", size=5, alpha=1e-4, beta=0.75, bias=1.0, opset=9),
    case("LRN", f32(1, 5, 2, 7) * 3, id="size1", size=1, alpha=0.3),
    case("LRN", f32(2, 3, 3, 2) * 3, id="wider-than-channels", size=7, alpha=0.2, beta=1.0),
    case("LayerNormalization", f32(2, 3, 8), f32(8), f32(8), id="last-axis", opset=17),
    case("LayerNormalization", f32(2, 3, 4), f32(3, 4), None, id="axis1-3-outputs", axis=1, opset=17, outputs=3),
    case("Resize", f32(1, 2, 3, 4), None, np.array([1, 1, 2, 2], np.float32), id="nearest-asym-floor",
         mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    case("Resize", f32(1, 2, 8, 9), None, None, i64(1, 2, 5, 4), id="nearest-half-pixel-down",
         mode="nearest", coordinate_transformation_mode="half_pixel"),
    case("Resize", f32(1, 2, 4, 5), None, None, i64(1, 2, 7, 9), id="nearest-align-corners-ceil",
         mode="nearest", coordinate_transformation_mode="align_corners", nearest_mode="round_prefer_ceil"),
    case("Resize", f32(1, 2, 4, 5), None, np.array([1, 1, 3, 1.5], np.float32), id="nearest-pytorch-ceil",
         mode="nearest", coordinate_transformation_mode="pytorch_half_pixel", nearest_mode="ceil"),
    case("Resize", f32(1, 2, 4, 5), None, np.array([1, 1, 2, 2], np.float32), id="linear-half-pixel",
         mode="linear", tol=1e-4),
    case("Resize", f32(1, 2, 4, 5), None, None, i64(1, 2, 7, 3), id="linear-align-corners",
         mode="linear", coordinate_transformation_mode="align_corners", tol=1e-4),
    case("Resize", f32(1, 2, 4, 5), None, np.array([1, 1, 1.5, 2.5], np.float32), id="linear-asymmetric",
         mode="linear", coordinate_transformation_mode="asymmetric", tol=1e-4),
    case("Resize", f32(1, 2, 8, 9), None, None, i64(1, 2, 1, 4), id="linear-pytorch-half-pixel-down",
         mode="linear", coordinate_transformation_mode="pytorch_half_pixel", tol=1e-4),
    case("Resize", f32(1, 2, 4, 5), np.zeros(0, np.float32), np.array([1, 1, 0.5, 2], np.float32),
         id="roi-input", mode="linear", opset=11, tol=1e-4),
    # Axes with scale 1 are copied even where the coordinate mode would shift them.
    case("Resize", f32(1, 3, 4, 5), None, np.array([1, 1, 2, 1.5], np.float32), id="tf-half-pixel-ceil",
         coordinate_transformation_mode="tf_half_pixel_for_nn", nearest_mode="ceil"),
    case("Resize", f32(1, 2, 4, 5), None, np.array([3, 0.5], np.float32), id="axes", axes=[3, 2], opset=18),
    case("Pad", f32(1, 2, 3, 4), i64(0, 0, 1, 2, 0, 0, 2, 1), np.array(1.5, np.float32), id="constant", opset=11),
    case("Pad", f32(1, 2, 4, 5), i64(0, 0, 2, 1, 0, 0, 1, 3), id="reflect", mode="reflect", opset=13),
    case("Pad", f32(2, 4, 5), i64(1, 0, 2, 0, 3, 1), id="edge-all-axes", mode="edge", opset=13),
    case("Pad", f32(3, 4, 5), i64(2, 1, 0, 1, 3, 4), id="reflect-all-axes", mode="reflect"),
    case("Pad", f32(1, 2, 3, 4), i64(0, -1, 2, -1), None, i64(1, -1), id="axes-crop", opset=18),
    case("Pad", f32(1, 2, 3, 4), i64(0, 0, 2, 5, 0, 0, 1, 3), id="wrap", mode="wrap", opset=19),
    case("Pad", f32(1, 2, 3), id="attrs", pads=[0, 1, 1, 0, 0, 2], value=-2.0, opset=10),
    case("LSTM", f32(3, 2, 4), f32(1, 20, 4), f32(1, 20, 5), f32(1, 40), None, f32(1, 2, 5), f32(1, 2, 5),
         outputs=3, hidden_size=5),
    case("LSTM", f32(3, 2, 4), f32(2, 20, 4), f32(2, 20, 5), None, None, None, None, f32(2, 15), outputs=3,
         id="bidirectional-peepholes", hidden_size=5, direction="bidirectional"),
    case("LSTM", f32(3, 2, 4), f32(1, 20, 4), f32(1, 20, 5), outputs=3, id="reverse-input-forget", hidden_size=5,
         direction="reverse", input_forget=1),
    case("GRU", f32(3, 2, 4), f32(2, 15, 4), f32(2, 15, 5), f32(2, 30), None, f32(2, 2, 5), outputs=2,
         id="bidirectional-linear-before-reset", hidden_size=5, direction="bidirectional", linear_before_reset=1),
    case("GRU", f32(3, 2, 4), f32(1, 15, 4), f32(1, 15, 5), f32(1, 30), outputs=2, id="reset-before-linear-clip",
         hidden_size=5, activations=["Sigmoid", "Relu"], clip=1.5),
]

ELEMENTWISE_CASES = [
    case("Add", f32(2, 3, 4), f32(3, 1)),
    case("Sub", f32(2, 3, 4), f32(4)),
    case("Mul", f32(2, 1, 4), f32(3, 1)),
    case("Div", f32(2, 3), pos(3), id="float"),
    case("Div", ints(3, 4, high=20), i64(3, -3, 7, -2), id="int-truncates"),
    case("Pow", pos(2, 3), f32(3), id="float"),
    case("Pow", f32(2, 3), i64(2), id="int-exponent"),
    case("Max", f32(2, 3), f32(3), f32(2, 1)),
    case("Min", f32(2, 3), f32(2, 3)),
    case("Sum", f32(2, 3), f32(3), f32(1, 3)),
    case("Sum", f32(1, 4, 3, 3), f32(1, 4, 3, 3), f32(1, 4, 3, 3), f32(4, 1, 1), f32(1, 4, 3, 3), id="five", opset=8),
    case("Mean", f32(2, 3), f32(3)),
    *[case(op, f32(2, 3, 4)) for op in ("Exp", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Softplus", "Softsign",
                                        "Floor", "Ceil", "Sign", "Sin", "Cos", "Identity")],
    *[case(op, pos(2, 3, 4)) for op in ("Sqrt", "Log", "Reciprocal")],
    case("Round", np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.4, 2.6], np.float32)),
    case("Erf", f32(2, 3, 4), tol=1e-4),
    case("HardSwish", f32(2, 3, 4), opset=14),
    case("Mish", f32(2, 3, 4), opset=18),
    case("Not", bools(3, 4)),
    case("IsNaN", np.array([[0.0, np.nan, -np.inf], [np.inf, -1.5, np.nan]], np.float32), id="2d"),
    case("IsNaN", np.array([0.0, np.nan, np.inf, -1.0], np.float32), id="1d"),
    case("IsInf", np.array([0.0, np.nan, np.inf, -np.inf], np.float32), id="both", opset=10),
    case("IsInf", np.array([0.0, np.inf, -np.inf], np.float32), id="negative-only", detect_positive=0),
    case("IsInf", np.array([0.0, np.inf, -np.inf], np.float32), id="positive-only", detect_negative=0),
    case("LeakyRelu", f32(2, 3), id="default"),
    case("LeakyRelu", f32(2, 3), id="alpha", alpha=0.3),
    case("Elu", f32(2, 3), alpha=0.7),
    case("Selu", f32(2, 3)),
    case("HardSigmoid", f32(2, 3) * 4, id="default"),
    case("HardSigmoid", f32(2, 3) * 4, id="alpha-beta", alpha=0.3, beta=0.4),
    case("Gelu", f32(2, 3, 4), id="erf", opset=20, tol=1e-4),
    case("Gelu", f32(2, 3, 4), id="tanh", approximate="tanh", opset=20, tol=1e-4),
    case("Clip", f32(3, 4), id="attrs", min=-0.5, max=0.5, opset=6),
    case("Clip", f32(3, 4), np.array(-0.5, np.float32), np.array(0.7, np.float32), id="inputs"),
    case("Clip", f32(3, 4), None, np.array(0.2, np.float32), id="max-only"),
    case("Clip", f32(3, 4), id="no-bounds"),
    case("Equal", ints(3, 4, high=2), ints(4, high=2)),
    case("Less", f32(3, 4), f32(4)),
    case("Greater", f32(3, 4), f32(3, 1)),
    case("LessOrEqual", ints(3, 4, high=2), ints(4, high=2)),
    case("GreaterOrEqual", ints(3, 4, high=2), ints(4, high=2)),
    case("And", bools(3, 4), bools(4)),
    case("Or", bools(3, 4), bools(4)),
    case("Xor", bools(3, 4), bools(3, 4)),
    case("Where", bools(3, 4), f32(3, 4), f32(4)),
    case("Cast", f32(3, 4) * 5, id="float-int32-truncates", to=TensorProto.INT32),
    case("Cast", ints(3, 4), id="int64-float16", to=TensorProto.FLOAT16),
    case("Cast", f32(3, 4), id="float-bool", to=TensorProto.BOOL),
    case("CastLike", f32(3, 4) * 5, ints(1), opset=15),
    case("Dropout", f32(3, 4), id="inference"),
    case("Dropout", f32(3, 4), np.array(0.3, np.float32), id="with-mask", opset=12, outputs=2),
    case("ReduceMean", f32(2, 3, 4), id="attr-axes", axes=[1, -1], keepdims=0),
    case("ReduceMean", f32(2, 3, 4), i64(0, 2), id="input-axes", opset=18),
    case("ReduceSum", f32(2, 3, 4), id="attr-axes", axes=[2], opset=11),
    case("ReduceSum", f32(2, 3, 4), id="all-axes", keepdims=0),
    case("ReduceSum", f32(2, 3, 4), id="noop-empty-axes", noop_with_empty_axes=1),
    case("ReduceMax", f32(2, 3, 4), id="attr-axes", axes=[1]),
    case("ReduceMin", f32(2, 3, 4), i64(-1), id="input-axes", keepdims=0, opset=18),
    case("ReduceProd", f32(2, 3, 4), id="attr-axes", axes=[0, 2]),
    case("ReduceL1", f32(2, 3, 4), id="attr-axes", axes=[1]),
    case("ReduceL1", f32(2, 3, 4), i64(0, 2), id="input-axes", keepdims=0, opset=18),
    case("ReduceL2", f32(2, 3, 4), id="attr-axes", axes=[-1]),
    case("ReduceL2", f32(2, 3, 4), id="all-axes", keepdims=0),
    case("ReduceL2", f32(2, 3, 4), i64(-1), id="input-axes", opset=18),
    case("ReduceSumSquare", f32(2, 3, 4), id="attr-axes", axes=[0, 1]),
    case("ReduceSumSquare", f32(2, 3, 4), i64(1), id="input-axes", opset=18),
    case("ReduceLogSum", pos(2, 3, 4), id="attr-axes", axes=[2], keepdims=0),
    case("ReduceLogSum", pos(2, 3, 4), i64(0), id="input-axes", opset=18),
    case("ReduceLogSumExp", f32(2, 3, 4) * 20, id="attr-axes-large", axes=[1], tol=1e-4),
    case("ReduceLogSumExp", f32(2, 3, 4), i64(0, 2), id="input-axes", keepdims=0, opset=18),
]

SHAPE_CASES = [
    case("Flatten", f32(2, 3, 4, 5), id="default"),
    case("Flatten", f32(2, 3, 4), id="axis0", axis=0),
    case("Flatten", f32(2, 3, 4), id="axis-neg1", axis=-1),
    case("Reshape", f32(2, 3, 4), i64(0, -1, 2), id="zero-copies"),
    case("Reshape", np.zeros((0, 3), np.float32), i64(3, 0), id="allowzero", allowzero=1, opset=14),
    case("Transpose", f32(2, 3, 4), id="default"),
    case("Transpose", f32(2, 3, 4, 5), id="perm", perm=[0, 2, 3, 1]),
    case("Concat", f32(2, 3), f32(2, 1), f32(2, 4), axis=-1),
    case("Split", f32(6, 4), id="attr-split", axis=0, split=[2, 4], opset=11, outputs=2),
    case("Split", f32(3, 6), id="equal", axis=1, opset=11, outputs=3),
    case("Split", f32(3, 7), i64(3, 1, 3), id="input-split", axis=-1, outputs=3),
    case("Split", f32(3, 7), id="num-outputs-uneven", axis=1, num_outputs=3, opset=18, outputs=3),
    case("Slice", f32(4, 5, 6), i64(1, 0), i64(3, -1), id="basic", opset=10),
    case("Slice", f32(4, 5, 6), i64(-1, 4), i64(INT64_MIN, 0), i64(0, -1), i64(-1, -2), id="negative-steps"),
    case("Slice", f32(4, 5, 6), i64(1, 0), i64(INT64_MAX, 100), i64(-2, 0), i64(2, 3), id="steps-int64-max"),
    # onnxruntime reads an INT64_MAX end with a negative step as "through the first element".
    case("Slice", f32(4, 5), i64(-2, 3), i64(INT64_MAX, 1), None, i64(-1, -1), id="negative-step-int64-max"),
    case("Slice", f32(4, 5), i64(1, 3), i64(0, 4), i64(0, 1), i64(-1, -1), id="negative-step-empty"),
    case("Slice", f32(4, 5), id="attrs", starts=[1], ends=[-1], axes=[1], opset=9),
    case("Squeeze", f32(1, 3, 1, 4), id="attr", axes=[0], opset=11),
    case("Squeeze", f32(1, 3, 1, 4), i64(-2), id="input"),
    case("Squeeze", f32(1, 3, 1, 4), id="all"),
    case("Unsqueeze", f32(3, 4), id="attr", axes=[0, 3], opset=11),
    case("Unsqueeze", f32(3, 4), i64(-1, 1), id="input-negative"),
    case("Shape", f32(2, 3, 4), id="full"),
    case("Shape", f32(2, 3, 4, 5), id="start-end", start=1, end=-1, opset=15),
    case("Size", f32(2, 3, 4)),
    case("Gather", f32(5, 4), i64(0, -1, 3), id="axis0-negative"),
    case("Gather", f32(3, 5, 2), ints(2, 2, high=5) % 5, id="axis1-2d-indices", axis=1),
    case("Gather", f32(3, 5), np.array(-2, np.int64), id="scalar-index", axis=1),
    case("GatherND", f32(4, 5, 3), np.array([[0, 1], [3, -1], [2, 4]], np.int64), id="k2-rows", opset=11),
    case("GatherND", f32(4, 5), np.array([[[1], [0]], [[3], [-2]]], np.int64), id="k1-slices"),
    case("GatherND", f32(3, 4, 5), np.array([[1], [0], [3]], np.int64), id="batch-dims1", batch_dims=1),
    case("GatherND", f32(2, 3, 4, 5), np.stack([RNG.integers(-4, 4, (2, 3, 2)), RNG.integers(-5, 5, (2, 3, 2))], -1),
         id="batch-dims2-k2-negative", batch_dims=2),
    case("GatherElements", f32(3, 4), np.array([[0, 2, -1, 1], [2, 0, 0, -3]], np.int64), id="axis0"),
    case("GatherElements", f32(2, 3, 4), RNG.integers(-4, 4, (2, 3, 2)), id="axis-1-negative", axis=-1),
    case("Expand", f32(3, 1), i64(2, 1, 4)),
    case("Tile", f32(2, 3), i64(2, 3)),
    case("ConstantOfShape", i64(2, 3), id="default"),
    case("ConstantOfShape", i64(4), id="int-value", value=helper.make_tensor("v", TensorProto.INT64, [1], [7])),
    case("Range", np.array(1.0, np.float32), np.array(3.0, np.float32), np.array(0.3, np.float32), id="float"),
    case("Range", np.array(10, np.int64), np.array(-3, np.int64), np.array(-4, np.int64), id="int"),
    case("Trilu", f32(2, 4, 5), np.array(1, np.int64), id="upper-k1", opset=14),
    case("Trilu", f32(4, 4), id="lower", upper=0, opset=14),
    case("DepthToSpace", f32(2, 8, 3, 4), id="dcr", blocksize=2, opset=11),
    case("DepthToSpace", f32(1, 18, 2, 3), id="crd", blocksize=3, mode="CRD", opset=13),
    case("DepthToSpace", f32(1, 4, 2, 2), id="opset1", blocksize=2, opset=9),
    case("SpaceToDepth", f32(2, 3, 4, 6), blocksize=2),
    case("CumSum", f32(3, 5), np.array(1, np.int64), id="axis1"),
    case("CumSum", f32(2, 4, 3), np.array(-2, np.int32), id="exclusive-reverse", exclusive=1, reverse=1),
    case("CumSum", ints(6).astype(np.int32), np.array(0, np.int64), id="int32-exclusive", exclusive=1),
    case("CumSum", ints(4, 3), np.array(0, np.int64), id="int64-reverse", reverse=1),
    case("Constant", id="tensor", value=numpy_helper.from_array(f32(2, 3))),
    case("Constant", id="value-float", value_float=2.5),
    case("Constant", id="value-floats", value_floats=[1.0, 2.0]),
    case("Constant", id="value-int", value_int=7),
    case("Constant", id="value-ints", value_ints=[3, -1]),
]


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


def _onnxruntime(node, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    value_infos = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                   for name, a in feeds.items()]
    outputs = [helper.make_empty_tensor_value_info(name) for name in node.output]
    graph = helper.make_graph([node], "one_node", value_infos, outputs)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("op, inputs, attrs, opset, n_outputs, tol", NN_CASES + ELEMENTWISE_CASES + SHAPE_CASES)
def test_converter_matches_onnxruntime(op, inputs, attrs, opset, n_outputs, tol):
    names = ["" if a is None else f"x{i}" for i, a in enumerate(inputs)]
    while names and not names[-1]:  # onnxruntime 1.31 crashes on a trailing "" in LayerNormalization
        names, inputs = names[:-1], inputs[:-1]
    node = helper.make_node(op, names, [f"y{i}" for i in range(n_outputs)], name=f"{op.lower()}_0", **attrs)
    feeds = {name: a for name, a in zip(names, inputs) if name}
    expected = _onnxruntime(node, feeds, opset)

    fn = find_converter(op, opset)
    assert fn is not None, f"no converter for {op} at opset {opset}"
    tensors = [torch.from_numpy(np.array(a)) if name else None for name, a in zip(names, inputs)]
    got = fn(OpNode.from_proto(node, opset), tensors)

    assert isinstance(got, tuple) and len(got) == n_outputs, f"{op} returned {type(got)} of {len(got)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        g = g.detach().numpy()
        assert g.dtype == e.dtype, f"output {i}: dtype {g.dtype} != onnxruntime's {e.dtype}"
        if np.issubdtype(e.dtype, np.floating):
            np.testing.assert_allclose(g, e, rtol=tol, atol=tol, err_msg=f"output {i}")
        else:
            np.testing.assert_array_equal(g, e, err_msg=f"output {i}")


def _lrn_by_the_text(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """LRN as the ONNX operator text writes it, one channel at a time (onnx 1.23's reference op loops
    over the batch axis instead of the channels, and takes 4-D inputs only)."""
    lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        window = x[:, max(0, c - lo):min(x.shape[1], c + hi + 1)].astype(np.float64)
        out[:, c] = x[:, c] / (bias + alpha / size * (window ** 2).sum(axis=1)) ** beta
    return out


@pytest.mark.parametrize("shape, size", [((2, 6, 4, 3), 4), ((2, 5, 7), 3), ((1, 4, 3, 2, 2), 2)],
                         ids=["even-size", "1d", "3d-even-size"])
def test_lrn_follows_the_onnx_window_where_onnxruntime_refuses(shape, size):
    """onnxruntime runs LRN on 4-D inputs of odd size only; for the rest the converter follows the
    ONNX text, which puts the extra channel of an even size after c (torch's local_response_norm puts
    it before)."""
    x = f32(*shape) * 3
    node = helper.make_node("LRN", ["x"], ["y"], name="lrn_0", size=size, alpha=0.5, beta=0.6, bias=2.0)
    expected = _lrn_by_the_text(x, size, 0.5, 0.6, 2.0)
    got = find_converter("LRN", 13)(OpNode.from_proto(node, 13), [torch.from_numpy(x)])[0].numpy()
    worst = float(np.abs(got - expected).max())
    assert got.shape == expected.shape and worst < 1e-5, f"LRN {shape} size {size}: off by {worst:.3g}"
    if size % 2 == 0:
        shifted = torch.nn.functional.local_response_norm(torch.from_numpy(x), size, 0.5, 0.6, 2.0).numpy()
        assert np.abs(shifted - expected).max() > 1e-3, "the case no longer tells the two windows apart"


def test_every_registered_op_has_a_case():
    covered = {p.values[0] for p in NN_CASES + ELEMENTWISE_CASES + SHAPE_CASES}
    covered.add("SimplifiedLayerNormalization")  # onnxruntime's op: tests/test_contrib_converters.py
    missing = sorted(set(supported_ops()) - covered)
    assert not missing, f"converters without an onnxruntime case: {missing}"


def test_inputs_are_not_modified():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    before = x.clone()
    node = OpNode.from_proto(helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 1, 0]), 13)
    find_converter("Conv", 13)(node, [x, w])
    torch.testing.assert_close(x, before)


def test_gradient_reaches_conv_weight():
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3, requires_grad=True)
    node = OpNode.from_proto(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), 13)
    (y,) = find_converter("Conv", 13)(node, [x, w])
    y.square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0, "no gradient reached the Conv weight"


@pytest.mark.parametrize("op, attrs, shapes, wrt", [
    ("Gemm", {"transB": 1}, [(3, 5), (4, 5), (4,)], 1),
    ("MaxPool", {"kernel_shape": [3, 3], "pads": [0, 1, 2, 0], "ceil_mode": 1}, [(1, 2, 6, 6)], 0),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [0, 1, 2, 0]}, [(1, 2, 6, 6)], 0),
    ("Resize", {"mode": "linear"}, [(1, 2, 3, 4), None, torch.tensor([1.0, 1.0, 2.0, 1.5])], 0),
    ("Pad", {"mode": "reflect"}, [(2, 5), torch.tensor([1, 2, 0, 3])], 0),
    ("Slice", {}, [(4, 5), torch.tensor([-1]), torch.tensor([-5]), torch.tensor([1]), torch.tensor([-2])], 0),
    ("DepthToSpace", {"blocksize": 2, "mode": "CRD"}, [(1, 8, 2, 3)], 0),
    ("CumSum", {"exclusive": 1, "reverse": 1}, [(3, 4), torch.tensor(1)], 0),
])
def test_gradient_reaches_data_input(op, attrs, shapes, wrt):
    inputs = [torch.randn(s, requires_grad=True) if isinstance(s, tuple) else s for s in shapes]
    node = OpNode.from_proto(helper.make_node(op, [f"x{i}" for i in range(len(inputs))], ["y"], **attrs), 13)
    (y,) = find_converter(op, 13)(node, inputs)
    y.square().sum().backward()
    grad = inputs[wrt].grad
    assert grad is not None and grad.abs().sum() > 0, f"no gradient reached input {wrt} of {op}"


def test_duplicate_registration_raises():
    with pytest.raises(RegistryError, match="Relu"):
        converter("Relu", since=6)(lambda node, inputs: inputs)


def test_find_converter_picks_version_by_opset():
    assert find_converter("Squeeze", 11) is not find_converter("Squeeze", 13)
    assert find_converter("Squeeze", 12) is find_converter("Squeeze", 11)
    assert find_converter("Squeeze", 21) is find_converter("Squeeze", 13)
    squeeze_11 = OpNode.from_proto(helper.make_node("Squeeze", ["x"], ["y"], axes=[0]), 11)
    (y,) = find_converter("Squeeze", 11)(squeeze_11, [torch.zeros(1, 3)])
    assert tuple(y.shape) == (3,)


def test_find_converter_unknown_op_or_domain():
    assert find_converter("NoSuchOp", 13) is None
    assert find_converter("Relu", 13, domain="com.microsoft") is None
    assert find_converter("Gelu", 19) is None, "Gelu exists from opset 20 only"


@pytest.mark.parametrize("op, attrs, opset, inputs, names", [
    ("Resize", {"mode": "cubic"}, 13, [torch.zeros(1, 1, 2, 2), None, torch.ones(4)], "'cubic'"),
    ("Resize", {"coordinate_transformation_mode": "tf_crop_and_resize"}, 13,
     [torch.zeros(1, 1, 2, 2), None, torch.ones(4)], "'tf_crop_and_resize'"),
    ("Pad", {"mode": "mirror"}, 13, [torch.zeros(2, 2), torch.tensor([1, 1, 1, 1])], "'mirror'"),
    ("Cast", {"to": TensorProto.STRING}, 13, [torch.zeros(2)], "STRING"),
    ("AveragePool", {"kernel_shape": [2, 2], "dilations": [2, 2]}, 19, [torch.zeros(1, 1, 4, 4)], "[2, 2]"),
    ("Dropout", {}, 13, [torch.zeros(2), None, torch.tensor(True)], "training_mode"),
])
def test_unsupported_attribute_names_op_node_and_value(op, attrs, opset, inputs, names):
    node = OpNode.from_proto(helper.make_node(op, ["x"] * len(inputs), ["y"], name="bad_node", **attrs), opset)
    with pytest.raises(NotImplementedError, match=rf"^{op} node 'bad_node' \(opset {opset}\)") as raised:
        find_converter(op, opset)(node, inputs)
    assert names in str(raised.value), f"{str(raised.value)!r} does not name {names}"
