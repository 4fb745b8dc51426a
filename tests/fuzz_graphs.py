"""Random small ONNX graphs for tests/test_fuzz.py: DAGs of the ops onnxflex quantizes or passes through.

``graphs()`` is a hypothesis strategy of (ModelProto, feeds): one float input (rank 2, 3 or 4, batch on
dim 0), sometimes a second int64 input cast to float, ops drawn from OPS where their shapes allow,
opsets 11-21, float32 or float16 or float64 throughout. Every generated model passes onnx.checker and
runs in onnxruntime; whether onnxflex quantizes it is what the fuzz test asks.
"""
from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}
SAMPLES = 32
UNARY = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Abs", "Neg")
WEIGHTED = ("Conv", "MatMul", "Gemm")
OPS = WEIGHTED * 3 + ("Add", "Mul", "Sub", "Concat", "Reshape", "Transpose", "Unary", "MaxPool",
       "GlobalAveragePool", "Softmax", "Flatten", "Clip", "BatchNormalization")


class _Builder:
    """Collects nodes, initializers and the shape of every tensor made so far."""

    def __init__(self, elem: int, rng: np.random.Generator) -> None:
        self.elem, self.dtype, self.rng = elem, DTYPES[elem], rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}

    def name(self, stem: str) -> str:
        return f"{stem}_{len(self.nodes)}_{len(self.inits)}"

    def const(self, array: np.ndarray, stem: str = "w") -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, *shape: int) -> str:
        scale = 1.0 / np.sqrt(max(int(np.prod(shape[1:])), 1))
        return self.const((self.rng.standard_normal(shape) * scale).astype(self.dtype))

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], named: bool, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op) if named else "", **attrs))
        self.shapes[out] = shape
        return out


def _apply(b: _Builder, op: str, x: str, other: str | None, draw) -> str | None:
    """One op on tensor ``x`` (``other``: a second tensor of the same shape, if any); None when ``op``
    does not fit ``x``'s shape."""
    shape, named = b.shapes[x], draw(st.booleans())
    rank = len(shape)
    if op == "Conv" and rank == 4:
        cout, k = draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 3]))
        group = shape[1] if draw(st.booleans()) and cout == shape[1] else 1
        pad = draw(st.sampled_from([0, k // 2]))
        h, w = shape[2] + 2 * pad - k + 1, shape[3] + 2 * pad - k + 1
        if h < 1 or w < 1:
            return None
        inputs = [x, b.weight(cout, shape[1] // group, k, k)]
        if draw(st.booleans()):
            inputs.append(b.weight(cout))
        return b.node("Conv", inputs, (shape[0], cout, h, w), named, kernel_shape=[k, k], pads=[pad] * 4,
                      group=group)
    if op == "MatMul" and rank >= 2:
        m = draw(st.sampled_from([1, 3, 8, 16]))
        return b.node("MatMul", [x, b.weight(shape[-1], m)], shape[:-1] + (m,), named)
    if op == "Gemm" and rank == 2:
        m, trans = draw(st.sampled_from([1, 4, 10])), draw(st.booleans())
        w = b.weight(m, shape[1]) if trans else b.weight(shape[1], m)
        inputs = [x, w] + ([b.weight(m)] if draw(st.booleans()) else [])
        return b.node("Gemm", inputs, (shape[0], m), named, transB=int(trans))
    if op in ("Add", "Mul", "Sub"):
        rhs = other if other is not None and draw(st.booleans()) else b.weight(shape[-1])
        return b.node(op, [x, rhs], shape, named)
    if op == "Concat" and other is not None and rank >= 2:
        axis = draw(st.integers(1, rank - 1))
        out = list(shape)
        out[axis] *= 2
        return b.node("Concat", [x, other], tuple(out), named, axis=axis)
    if op == "Reshape" and rank >= 3:
        target = b.const(np.array([0, -1], np.int64), "shape")
        return b.node("Reshape", [x, target], (shape[0], int(np.prod(shape[1:]))), named)
    if op == "Flatten" and rank >= 3:
        return b.node("Flatten", [x], (shape[0], int(np.prod(shape[1:]))), named, axis=1)
    if op == "Transpose" and rank >= 3:
        perm = [0] + list(range(1, rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return b.node("Transpose", [x], tuple(shape[p] for p in perm), named, perm=perm)
    if op == "Unary":
        return b.node(draw(st.sampled_from(UNARY)), [x], shape, named)
    if op == "MaxPool" and rank == 4 and shape[2] >= 2 and shape[3] >= 2:
        return b.node("MaxPool", [x], shape[:2] + (shape[2] // 2, shape[3] // 2), named, kernel_shape=[2, 2],
                      strides=[2, 2])
    if op == "GlobalAveragePool" and rank == 4:
        return b.node("GlobalAveragePool", [x], shape[:2] + (1, 1), named)
    if op == "Softmax" and rank >= 2:
        return b.node("Softmax", [x], shape, named, axis=-1)
    if op == "Clip":
        lo, hi = b.const(np.array(-1.0, b.dtype), "lo"), b.const(np.array(1.0, b.dtype), "hi")
        return b.node("Clip", [x, lo, hi], shape, named)
    if op == "BatchNormalization" and rank == 4:
        c = shape[1]
        stats = [b.const((1 + 0.1 * b.rng.standard_normal(c)).astype(b.dtype)),
                 b.const((0.1 * b.rng.standard_normal(c)).astype(b.dtype)),
                 b.const((0.1 * b.rng.standard_normal(c)).astype(b.dtype)),
                 b.const((1 + 0.1 * b.rng.random(c)).astype(b.dtype))]
        return b.node("BatchNormalization", [x] + stats, shape, named)
    return None


@st.composite
def graphs(draw):
    """(model, feeds): see the module docstring. ``feeds`` holds SAMPLES samples of every input."""
    opset = draw(st.integers(11, 21))
    elem = draw(st.sampled_from([TensorProto.FLOAT] * 6 + [TensorProto.FLOAT16, TensorProto.DOUBLE]))
    rank = draw(st.sampled_from([2, 3, 4]))
    dims = {2: [draw(st.sampled_from([3, 8, 16]))],
            3: [draw(st.integers(1, 4)), draw(st.sampled_from([4, 8]))],
            4: [draw(st.sampled_from([1, 3, 4])), draw(st.integers(2, 8)), draw(st.integers(2, 8))]}[rank]
    b = _Builder(elem, np.random.default_rng(draw(st.integers(0, 2**16))))
    batch = draw(st.sampled_from(["N", "", None, 1]))
    first = helper.make_tensor_value_info("x", elem, [batch] + dims)
    b.shapes["x"] = (SAMPLES, *dims)
    inputs, feeds = [first], {"x": b.rng.standard_normal((SAMPLES, *dims)).astype(b.dtype)}
    if draw(st.integers(0, 5)) == 0:  # an integer input, cast to float and added to the float one
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [batch] + dims))
        feeds["ids"] = b.rng.integers(0, 3, (SAMPLES, *dims)).astype(np.int64)
        cast = b.node("Cast", ["ids"], b.shapes["x"], False, to=elem)
        b.node("Add", ["x", cast], b.shapes["x"], True)
    tensors = [b.nodes[-1].output[0]] if len(inputs) > 1 else ["x"]
    weighted = draw(st.integers(0, 7)) > 0  # mostly a weighted op first; else maybe none (refused)
    for step in range(draw(st.integers(1, 7))):
        x = draw(st.sampled_from(tensors))
        twins = [t for t in tensors if t != x and b.shapes[t] == b.shapes[x]]
        other = draw(st.sampled_from(twins)) if twins else None
        fits = ("Conv", "MatMul") if rank == 4 else ("Gemm", "MatMul") if rank == 2 else ("MatMul",)
        op = draw(st.sampled_from(fits if step == 0 and weighted else OPS))
        out = _apply(b, op, x, other, draw)
        if out is not None and int(np.prod(b.shapes[out])) <= 1 << 16:
            tensors.append(out)
    produced = [t for t in tensors if t != "x"] or [b.node("Relu", ["x"], b.shapes["x"], True)]
    chosen = {produced[-1]} | ({draw(st.sampled_from(produced))} if draw(st.booleans()) else set())
    outputs = [helper.make_tensor_value_info(t, elem, [batch] + list(b.shapes[t][1:])) for t in sorted(chosen)]
    graph = helper.make_graph(b.nodes, "fuzz", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnxflex-fuzz")
    model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    return model, feeds


def describe(model: onnx.ModelProto) -> str:
    """One line: opset, dtype, input shapes and the op sequence (how failures are recorded)."""
    ins = ", ".join(f"{vi.name}{[d.dim_value or d.dim_param or '?' for d in vi.type.tensor_type.shape.dim]}"
                    for vi in model.graph.input)
    elem = TensorProto.DataType.Name(model.graph.input[0].type.tensor_type.elem_type)
    return (f"opset {model.opset_import[0].version} {elem} {ins}: "
            + " ".join(n.op_type for n in model.graph.node))
