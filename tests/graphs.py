"""Small seeded ONNX models shaped like other frameworks' exports, for the foreign-model tests.

Each builder takes a seed and returns a checked ModelProto (IR version the lowest its opset needs, so
the installed onnxruntime loads it). Weights are He-initialised, biases small, BatchNorm statistics
near identity, so a W8A8 quantization of any of them should keep well over 20 dB of output SQNR.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

N = "N"  # a dynamic batch dimension


class _Builder:
    """Collects initializers and nodes; ``const`` names and adds an initializer, ``node`` a node."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def he(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))

    def conv_weight(self, name: str, c_out: int, c_in: int, k: int) -> str:
        return self.he(name, (c_out, c_in, k, k), c_in * k * k)

    def small(self, name: str, shape: tuple[int, ...], scale: float = 0.1) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def bn_params(self, prefix: str, c: int) -> list[str]:
        """gamma, beta, mean, var of an inference BatchNormalization over ``c`` channels."""
        return [self.const(f"{prefix}_gamma", self.rng.uniform(0.5, 1.5, c).astype(np.float32)),
                self.small(f"{prefix}_beta", (c,)), self.small(f"{prefix}_mean", (c,)),
                self.const(f"{prefix}_var", self.rng.uniform(0.5, 1.5, c).astype(np.float32))]

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str | None = None, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0] if name is None else name,
                                           **attrs))
        return outputs[0]

    def model(self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              opset: int, initializers_as_inputs: bool = False) -> onnx.ModelProto:
        graph_inputs = list(inputs)
        if initializers_as_inputs:  # the pre-IR-4 convention some converters still write
            graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(self.nodes, name, graph_inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="onnxflex-tests")
        model.ir_version = helper.find_min_ir_version_for(model.opset_import)
        onnx.checker.check_model(model, full_check=True)
        return model


def _image(batch: int | str = N, channels: int = 3, size: int = 16) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])


def _vector(batch: int | str = N, features: int = 32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])


def _out(*dims: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))


def conv_bias_add(seed: int = 0) -> onnx.ModelProto:
    """Conv without bias + Add of a [1,C,1,1] / [C,1,1] bias (TF/Keras converters), then a Gemm head."""
    b = _Builder(seed)
    b.node("Conv", ["x", b.conv_weight("w1", 8, 3, 3)], ["c1"], pads=[1, 1, 1, 1])
    b.node("Add", ["c1", b.small("b1", (1, 8, 1, 1))], ["a1"])
    b.node("Relu", ["a1"], ["r1"])
    b.node("Conv", ["r1", b.conv_weight("w2", 16, 8, 3)], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2])
    b.node("Add", [b.small("b2", (16, 1, 1)), "c2"], ["a2"])  # bias first: Add is commutative
    b.node("Relu", ["a2"], ["r2"])
    b.node("GlobalAveragePool", ["r2"], ["gap"])
    b.node("Flatten", ["gap"], ["flat"])
    b.node("Gemm", ["flat", b.he("w3", (10, 16), 16), b.small("b3", (10,))], ["y"], transB=1)
    return b.model("conv_bias_add", [_image()], [_out(N, 10)], opset=13)


def conv_mul_add_bn(seed: int = 0) -> onnx.ModelProto:
    """BatchNorm already folded into per-channel Mul/Add constant chains ([1,C,1,1] and [C,1,1]); opset 12."""
    b = _Builder(seed)
    b.node("Conv", ["x", b.conv_weight("w1", 8, 3, 3), b.small("b1", (8,))], ["c1"], pads=[1, 1, 1, 1])
    b.node("Mul", ["c1", b.const("s1", b.rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32))], ["m1"])
    b.node("Add", ["m1", b.small("t1", (1, 8, 1, 1))], ["a1"])
    b.node("Relu", ["a1"], ["r1"])
    b.node("Conv", ["r1", b.conv_weight("w2", 8, 8, 3)], ["c2"], pads=[1, 1, 1, 1])
    b.node("Mul", ["c2", b.const("s2", b.rng.uniform(0.5, 1.5, (8, 1, 1)).astype(np.float32))], ["m2"])
    b.node("Add", ["m2", b.small("t2", (8, 1, 1))], ["a2"])
    b.node("Relu", ["a2"], ["y"])
    return b.model("conv_mul_add_bn", [_image()], [_out(N, 8, 16, 16)], opset=12)


def conv_batchnorm(seed: int = 0) -> onnx.ModelProto:
    """Unfolded BatchNormalization after each Conv, Clip(0, 6) with min/max inputs; opset 11."""
    b = _Builder(seed)
    b.node("Conv", ["x", b.conv_weight("w1", 8, 3, 3)], ["c1"], pads=[1, 1, 1, 1])
    b.node("BatchNormalization", ["c1"] + b.bn_params("bn1", 8), ["n1"])
    lo, hi = b.const("zero", np.array(0.0, np.float32)), b.const("six", np.array(6.0, np.float32))
    b.node("Clip", ["n1", lo, hi], ["r1"])
    b.node("Conv", ["r1", b.conv_weight("w2", 16, 8, 3), b.small("b2", (16,))], ["c2"], pads=[1, 1, 1, 1],
           strides=[2, 2])
    b.node("BatchNormalization", ["c2"] + b.bn_params("bn2", 16), ["n2"], epsilon=1e-3)
    b.node("Relu", ["n2"], ["y"])
    return b.model("conv_batchnorm", [_image()], [_out(N, 16, 8, 8)], opset=11)


def hardswish_se(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV3-style: Conv → HardSwish, a squeeze-excite gate (GlobalAveragePool → Conv → Relu → Conv →
    HardSigmoid → Mul with the trunk), then a projection Conv; opset 17."""
    b = _Builder(seed)
    b.node("Conv", ["x", b.conv_weight("w1", 16, 3, 3), b.small("b1", (16,))], ["c1"], pads=[1, 1, 1, 1])
    b.node("HardSwish", ["c1"], ["h1"])
    b.node("GlobalAveragePool", ["h1"], ["se_pool"])
    b.node("Conv", ["se_pool", b.conv_weight("se_w1", 4, 16, 1), b.small("se_b1", (4,))], ["se_c1"])
    b.node("Relu", ["se_c1"], ["se_r1"])
    b.node("Conv", ["se_r1", b.conv_weight("se_w2", 16, 4, 1), b.small("se_b2", (16,))], ["se_c2"])
    b.node("HardSigmoid", ["se_c2"], ["se_gate"], alpha=1.0 / 6, beta=0.5)
    b.node("Mul", ["h1", "se_gate"], ["excited"])
    b.node("Conv", ["excited", b.conv_weight("w2", 8, 16, 1), b.small("b2", (8,))], ["c2"])
    b.node("HardSigmoid", ["c2"], ["hs2"], alpha=1.0 / 6, beta=0.5)  # HardSwish as x * HardSigmoid(x)
    b.node("Mul", ["c2", "hs2"], ["y"])
    return b.model("hardswish_se", [_image()], [_out(N, 8, 16, 16)], opset=17)


def reshape_transpose_head(seed: int = 0) -> onnx.ModelProto:
    """Conv trunk, then a token head: Reshape → Transpose → MatMul + Add(bias) → Transpose → Reshape →
    Gemm(transB=0); opset 13, dynamic batch (Reshape copies dim 0 with a 0)."""
    b = _Builder(seed)
    b.node("Conv", ["x", b.conv_weight("w1", 8, 3, 3), b.small("b1", (8,))], ["c1"], pads=[1, 1, 1, 1],
           strides=[2, 2])
    b.node("Relu", ["c1"], ["r1"])
    b.node("Reshape", ["r1", b.const("tokens_shape", np.array([0, 8, 64], np.int64))], ["tokens_cf"])
    b.node("Transpose", ["tokens_cf"], ["tokens"], perm=[0, 2, 1])
    b.node("MatMul", ["tokens", b.he("w2", (8, 16), 8)], ["mm"])
    b.node("Add", ["mm", b.small("b2", (16,))], ["mm_b"])
    b.node("Relu", ["mm_b"], ["r2"])
    b.node("Transpose", ["r2"], ["r2_t"], perm=[0, 2, 1])
    b.node("Reshape", ["r2_t", b.const("flat_shape", np.array([0, -1], np.int64))], ["flat"])
    b.node("Gemm", ["flat", b.he("w3", (1024, 10), 1024), b.small("b3", (10,))], ["y"])
    return b.model("reshape_transpose_head", [_image()], [_out(N, 10)], opset=13)


def weights_through_ops(seed: int = 0) -> onnx.ModelProto:
    """Weights fed through Identity (Conv), Transpose (Gemm transB=1) and Cast from float16 (MatMul)."""
    b = _Builder(seed)
    w1 = b.node("Identity", [b.conv_weight("w1_raw", 8, 3, 3)], ["w1"])
    b.node("Conv", ["x", w1, b.small("b1", (8,))], ["c1"], pads=[1, 1, 1, 1])
    b.node("Relu", ["c1"], ["r1"])
    b.node("GlobalAveragePool", ["r1"], ["gap"])
    b.node("Flatten", ["gap"], ["flat"])
    w2 = b.node("Transpose", [b.he("w2_kn", (8, 32), 8)], ["w2"], perm=[1, 0])
    b.node("Gemm", ["flat", w2, b.small("b2", (32,))], ["g2"], transB=1)
    b.node("Relu", ["g2"], ["r2"])
    w3_half = b.const("w3_half", (b.rng.standard_normal((32, 10)) * np.sqrt(2.0 / 32)).astype(np.float16))
    w3 = b.node("Cast", [w3_half], ["w3"], to=TensorProto.FLOAT)
    b.node("MatMul", ["r2", w3], ["mm"])
    b.node("Add", ["mm", b.small("b3", (10,))], ["y"])
    return b.model("weights_through_ops", [_image()], [_out(N, 10)], opset=13)


def shared_weights(seed: int = 0) -> onnx.ModelProto:
    """One Conv weight read by two Convs (a recurrent-style unrolled block) and one Gemm weight read by
    two Gemms; the second Conv adds a residual."""
    b = _Builder(seed)
    b.node("Conv", ["x", b.conv_weight("w_stem", 8, 3, 3)], ["c0"], pads=[1, 1, 1, 1])
    b.node("Relu", ["c0"], ["r0"])
    shared = b.conv_weight("w_shared", 8, 8, 3)
    bias = b.small("b_shared", (8,))
    b.node("Conv", ["r0", shared, bias], ["c1"], pads=[1, 1, 1, 1])
    b.node("Relu", ["c1"], ["r1"])
    b.node("Conv", ["r1", shared, bias], ["c2"], pads=[1, 1, 1, 1])
    b.node("Add", ["c2", "r0"], ["res"])
    b.node("Relu", ["res"], ["r2"])
    b.node("GlobalAveragePool", ["r2"], ["gap"])
    b.node("Flatten", ["gap"], ["flat"])
    fc = b.he("w_fc", (8, 8), 8)
    b.node("Gemm", ["flat", fc], ["g1"], transB=1)
    b.node("Relu", ["g1"], ["gr1"])
    b.node("Gemm", ["gr1", fc], ["y"], transB=1)
    return b.model("shared_weights", [_image()], [_out(N, 8)], opset=13)


def messy_names(seed: int = 0) -> onnx.ModelProto:
    """Empty node names and initializers also listed as graph inputs (old IR style)."""
    b = _Builder(seed)
    b.node("Conv", ["x", b.conv_weight("w1", 8, 3, 3), b.small("b1", (8,))], ["t0"], name="", pads=[1, 1, 1, 1])
    b.node("Relu", ["t0"], ["t1"], name="")
    b.node("Conv", ["t1", b.conv_weight("w2", 8, 8, 3), b.small("b2", (8,))], ["t2"], name="", pads=[1, 1, 1, 1])
    b.node("Relu", ["t2"], ["t3"], name="")
    b.node("GlobalAveragePool", ["t3"], ["t4"], name="")
    b.node("Flatten", ["t4"], ["t5"], name="")
    b.node("Gemm", ["t5", b.he("w3", (10, 8), 8), b.small("b3", (10,))], ["y"], name="", transB=1)
    return b.model("messy_names", [_image()], [_out(N, 10)], opset=13, initializers_as_inputs=True)


def duplicate_names(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """Several nodes named alike: onnx.checker accepts it, onnxruntime refuses to load the model."""
    b = _Builder(seed)
    b.node("Conv", ["x", b.conv_weight("w1", 8, 3, 3), b.small("b1", (8,))], ["t0"], name="conv",
           pads=[1, 1, 1, 1])
    b.node("Relu", ["t0"], ["t1"], name="conv")
    b.node("Conv", ["t1", b.conv_weight("w2", 8, 8, 3), b.small("b2", (8,))], ["t2"], name="conv",
           pads=[1, 1, 1, 1])
    b.node("Relu", ["t2"], ["y"], name="relu")
    return b.model(f"duplicate_names_opset{opset}", [_image()], [_out(N, 8, 16, 16)], opset=opset)


def duplicate_names_opset11(seed: int = 0) -> onnx.ModelProto:
    """duplicate_names at opset 11, which canonicalize upgrades through onnx's version converter."""
    return duplicate_names(seed, opset=11)


def fixed_batch_reshape(seed: int = 0) -> onnx.ModelProto:
    """Batch fixed to 1 in the input and in a Reshape target shape [1, -1], as fixed-shape converters
    (TF, TFLite) write heads."""
    b = _Builder(seed)
    b.node("Conv", ["x", b.conv_weight("w1", 8, 3, 3), b.small("b1", (8,))], ["c1"], pads=[1, 1, 1, 1],
           strides=[2, 2])
    b.node("Relu", ["c1"], ["r1"])
    b.node("Reshape", ["r1", b.const("flat_shape", np.array([1, -1], np.int64))], ["flat"])
    b.node("Gemm", ["flat", b.he("w2", (10, 512), 512), b.small("b2", (10,))], ["y"], transB=1)
    return b.model("fixed_batch_reshape", [_image(batch=1)], [_out(1, 10)], opset=13)


def conv_add_along_width(seed: int = 0) -> onnx.ModelProto:
    """A [16] constant added to a Conv output [N,16,16,16]: it broadcasts along the width, not the
    channels, so it is no bias and must not be folded into the Conv."""
    b = _Builder(seed)
    b.node("Conv", ["x", b.conv_weight("w1", 16, 3, 3), b.small("b1", (16,))], ["c1"], pads=[1, 1, 1, 1])
    b.node("Add", ["c1", b.const("ramp", np.linspace(-1, 1, 16).astype(np.float32))], ["a1"])
    b.node("Relu", ["a1"], ["r1"])
    b.node("Conv", ["r1", b.conv_weight("w2", 8, 16, 3)], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])
    return b.model("conv_add_along_width", [_image()], [_out(N, 8, 8, 8)], opset=13)


def gemm_mlp(seed: int = 0) -> onnx.ModelProto:
    """Gemm with transB=1, transB=0 and a [1, C] bias, a BatchNormalization after a Gemm; opset 17."""
    b = _Builder(seed)
    b.node("Gemm", ["x", b.he("w1", (64, 32), 32), b.small("b1", (64,))], ["g1"], transB=1)
    b.node("Relu", ["g1"], ["r1"])
    b.node("Gemm", ["r1", b.he("w2", (64, 32), 64), b.small("b2", (1, 32))], ["g2"], transB=0)
    b.node("BatchNormalization", ["g2"] + b.bn_params("bn2", 32), ["n2"])
    b.node("Relu", ["n2"], ["r2"])
    b.node("Gemm", ["r2", b.he("w3", (10, 32), 32), b.small("b3", (10,))], ["y"], transB=1)
    return b.model("gemm_mlp", [_vector()], [_out(N, 10)], opset=17)


def matmul_bias_mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul with a constant 2-D weight followed by Add(bias), twice; opset 13, fixed batch 1."""
    b = _Builder(seed)
    b.node("MatMul", ["x", b.he("w1", (32, 64), 32)], ["m1"])
    b.node("Add", ["m1", b.small("b1", (64,))], ["a1"])
    b.node("Relu", ["a1"], ["r1"])
    b.node("MatMul", ["r1", b.he("w2", (64, 16), 64)], ["m2"])
    b.node("Add", [b.small("b2", (1, 16)), "m2"], ["y"])
    return b.model("matmul_bias_mlp", [_vector(batch=1)], [_out(1, 16)], opset=13)


def mobilenet_clip6(seed: int = 0) -> onnx.ModelProto:
    """Conv → Clip(0,6) → depthwise Conv → Clip(0,6) → 1x1 Conv → BatchNormalization; opset 12."""
    b = _Builder(seed)
    lo, hi = b.const("zero", np.array(0.0, np.float32)), b.const("six", np.array(6.0, np.float32))
    b.node("Conv", ["x", b.conv_weight("w1", 16, 3, 3), b.small("b1", (16,))], ["c1"], pads=[1, 1, 1, 1],
           strides=[2, 2])
    b.node("Clip", ["c1", lo, hi], ["r1"])
    b.node("Conv", ["r1", b.he("w_dw", (16, 1, 3, 3), 9), b.small("b_dw", (16,))], ["c2"], pads=[1, 1, 1, 1],
           group=16)
    b.node("Clip", ["c2", lo, hi], ["r2"])
    b.node("Conv", ["r2", b.conv_weight("w3", 8, 16, 1)], ["c3"])
    b.node("BatchNormalization", ["c3"] + b.bn_params("bn3", 8), ["y"])
    return b.model("mobilenet_clip6", [_image()], [_out(N, 8, 8, 8)], opset=12)


def affine_after(op: str, shape: tuple[int, ...], affine: str = "Add", seed: int = 0) -> onnx.ModelProto:
    """``op`` (a 1x1 Conv on [N,3,8,8] or a Gemm on [N,3]) with 8 output channels, then ``affine``
    (Add or Mul) with a constant of ``shape``: per channel or not, depending on how it broadcasts."""
    b = _Builder(seed)
    if op == "Conv":
        x = _image(channels=3, size=8)
        b.node("Conv", ["x", b.conv_weight("w", 8, 3, 1), b.small("b", (8,))], ["z"])
    else:
        x = _vector(features=3)
        b.node("Gemm", ["x", b.he("w", (8, 3), 3), b.small("b", (8,))], ["z"], transB=1)
    b.node(affine, ["z", b.const("c", b.rng.uniform(0.5, 1.5, shape).astype(np.float32))], ["y"])
    rank = max(len(x.type.tensor_type.shape.dim), len(shape))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(rank)])
    return b.model(f"{op}_{affine}_{'x'.join(map(str, shape))}", [x], [out], opset=13)


BUILDERS: dict[str, Callable[[int], onnx.ModelProto]] = {fn.__name__: fn for fn in (
    conv_bias_add, conv_mul_add_bn, conv_batchnorm, mobilenet_clip6, hardswish_se, reshape_transpose_head,
    weights_through_ops, shared_weights, messy_names, duplicate_names, duplicate_names_opset11,
    fixed_batch_reshape, conv_add_along_width, gemm_mlp, matmul_bias_mlp)}


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs fed at run time (initializers listed as inputs left out)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def random_calibration(model: onnx.ModelProto, n: int, seed: int) -> dict[str, np.ndarray]:
    """{input name: float32 standard-normal array [n, *dims[1:]]}: samples on dim 0 whatever the model
    fixes there (dynamic or 1); other dims must be static."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for vi in model_inputs(model):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if any(d is None for d in dims[1:]):
            raise ValueError(f"input {vi.name!r} has a dynamic dimension after dim 0: {dims}")
        arrays[vi.name] = rng.standard_normal([n] + dims[1:]).astype(np.float32)
    return arrays
