"""Ops that onnxruntime registers in the default ONNX domain although ONNX does not define them.

onnxruntime runs them, but onnx.checker refuses a model that holds them ("No Op registered for ... with
domain_version of ..."), so an emitted model that kept them would fail the check every emitted model
must pass. Each op with a known lowering is rewritten into standard ONNX ops that compute the same
values and that onnxruntime's graph optimizer fuses back into its own kernel; the torch side then
reads standard ops too. One found: SimplifiedLayerNormalization (RMSNorm, written by onnxruntime-genai's
model builder).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxflex.graph import DEFAULT_DOMAINS, NameScope, default_opset

Lowering = Callable[[onnx.NodeProto, "_Context"], "list[onnx.NodeProto] | None"]


class _Context:
    """What a lowering reads (the model's opset, element types) and adds (initializers, names)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.opset = default_opset(model)
        self.scope = NameScope.of(model)
        self.initializers: list[onnx.TensorProto] = []
        self.types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input)
                      + list(g.output) if vi.type.HasField("tensor_type")}
        self.types.update({t.name: t.data_type for t in g.initializer})

    def constant(self, base: str, value: np.ndarray) -> str:
        name = self.scope.unique_name(base)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op_type: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> onnx.NodeProto:
        name = self.scope.unique_name(op_type)
        return helper.make_node(op_type, inputs, outputs or [self.scope.unique_name(f"{name}_out")], name=name,
                                **attrs)


def _simplified_layer_norm(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto] | None:
    """Y = X / sqrt(mean(X², axes axis..-1) + epsilon) * scale, for float32 X with a negative axis (the
    rank needs not be known); None (kept as it is) otherwise, or when its inv_std_var output is read."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis, epsilon = attrs.get("axis", -1), attrs.get("epsilon", 1e-5)
    if ctx.types.get(node.input[0]) != onnx.TensorProto.FLOAT or axis >= 0 or any(node.output[1:]):
        return None
    x, scale = node.input[0], node.input[1]
    axes = np.arange(axis, 0, dtype=np.int64)
    square = ctx.node("Pow", [x, ctx.constant(f"{node.name}_two", np.array(2.0, np.float32))])
    if ctx.opset >= 18:
        mean = ctx.node("ReduceMean", [square.output[0], ctx.constant(f"{node.name}_axes", axes)], keepdims=1)
    else:
        mean = ctx.node("ReduceMean", [square.output[0]], axes=axes.tolist(), keepdims=1)
    shifted = ctx.node("Add", [mean.output[0], ctx.constant(f"{node.name}_epsilon", np.array(epsilon, np.float32))])
    root = ctx.node("Sqrt", [shifted.output[0]])
    normed = ctx.node("Div", [x, root.output[0]])
    scaled = ctx.node("Mul", [normed.output[0], scale], [node.output[0]])
    return [square, mean, shifted, root, normed, scaled]


LOWERINGS: dict[str, Lowering] = {"SimplifiedLayerNormalization": _simplified_layer_norm}


def lower_ort_default_ops(model: onnx.ModelProto) -> int:
    """Mutates ``model``: each top-level default-domain node with a lowering in LOWERINGS (ops ONNX does
    not define at the model's opset) becomes the standard ops of its lowering, its output names kept.
    Reads element types from value_info (run shape inference first). Returns how many it rewrote."""
    if not any(n.op_type in LOWERINGS and n.domain in DEFAULT_DOMAINS for n in model.graph.node):
        return 0
    ctx = _Context(model)
    nodes, rewritten = [], 0
    for node in model.graph.node:
        lowering = LOWERINGS.get(node.op_type) if node.domain in DEFAULT_DOMAINS else None
        lowered = lowering(node, ctx) if lowering and not _defined(node.op_type, ctx.opset) else None
        nodes.extend(lowered or [node])
        rewritten += lowered is not None
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(ctx.initializers)
    return rewritten


def _defined(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True
