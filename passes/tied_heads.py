"""untie_heads: a weight-only run quantizes a head that shares its weight from a copy of its own.

A language model with tied embeddings reads one table twice: the embedding Gather looks rows up in it
and the head (lm_head) multiplies by it, as Gemm(transB=1) on the same initializer or through a
Transpose. The emitter replaces every read of a quantized initializer with its DequantizeLinear, so
quantizing the head would also change what the Gather reads (and what the torch simulation, which keeps
the block holding the Gather float, does not). The head gets a copy of the initializer instead: the
Gather keeps reading the float table, the head is quantized like any other layer (the copy, read once,
is then transposed to [K, N] by gemm_kn_weights and runs as MatMulNBits). A Transpose of the table is
already folded into an initializer of its own by canonicalize, so only a shared initializer needs this.
"""
from __future__ import annotations

import onnx

from onnxflex.graph import NameScope
from onnxflex.passes.context import PassContext
from onnxflex.passes.control_flow import read_counts
from onnxflex.placement import head_nodes


def untie_heads(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Mutates and returns ``model``: in a weight-only run (abits 0), each top-level head
    (placement.head_nodes) that the run quantizes (not excluded, head bits not 0) and whose weight
    initializer another node also reads gets a copy of that initializer under a new name as its weight.
    Other runs return ``model`` unchanged."""
    if ctx.config.abits:
        return model
    inits = {t.name: t for t in model.graph.initializer}
    readers = read_counts(model.graph)
    heads = head_nodes(model.graph)
    scope = NameScope.of(model)
    for node in model.graph.node:
        if node.name not in heads or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if ctx.config.keeps_float(node.name, node.op_type) or not ctx.config.bits_for(node.name, head=True):
            continue
        shared = inits[node.input[1]]
        if readers.get(shared.name, 0) < 2:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(shared)
        copy.name = scope.unique_name(f"{shared.name}_head")
        model.graph.initializer.append(copy)
        node.input[1] = copy.name
        readers[shared.name] -= 1
    return model
