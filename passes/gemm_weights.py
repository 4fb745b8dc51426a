"""gemm_kn_weights: weight-only runs store a Gemm's constant weight as [K, N] (transB=0).

torch.nn.Linear exports as Gemm(transB=1) with its weight [N, K]; onnxruntime fuses a weight-only
DequantizeLinear into MatMulNBits only when the weight is [K, N], and otherwise runs the Gemm in float
on the dequantized weight. Transposing the initializer and clearing transB computes the same product,
so the layer's weight is quantized, simulated and emitted in the layout that fuses. Activation-quantized
runs keep the Gemm as exported (QGemm reads either layout).
"""
from __future__ import annotations

import onnx
from onnx import numpy_helper

from onnxflex.extdata import tensor_array
from onnxflex.graph import node_attr
from onnxflex.passes.control_flow import read_counts
from onnxflex.passes.context import PassContext


def gemm_kn_weights(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Mutates and returns ``model``: in a weight-only run (abits 0), each top-level Gemm with transB=1
    whose weight is a 2-D initializer read by no other node gets that initializer transposed in place
    (same name, shape [K, N]) and transB=0. Other runs return ``model`` unchanged."""
    if ctx.config.abits:
        return model
    inits = {t.name: t for t in model.graph.initializer}
    readers = read_counts(model.graph)  # a read by a subgraph counts too: it would see the transposed weight
    for node in model.graph.node:
        if node.op_type != "Gemm" or not node_attr(node, "transB", 0) or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or readers.get(weight.name, 0) != 1:
            continue
        weight.CopyFrom(numpy_helper.from_array(tensor_array(weight, model).T.copy(), weight.name))
        kept = [a for a in node.attribute if a.name != "transB"]  # transB's default is 0
        del node.attribute[:]
        node.attribute.extend(kept)
    return model
