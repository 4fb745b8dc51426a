"""The rewrite behind the ``silu`` emitter stage (emit/qdq.py): a SiLU reading a DequantizeLinear as one QuickGelu.

A SiLU exported as ``Mul(x, Sigmoid(x))`` fuses into onnxruntime's QuickGelu (alpha 1) in a float
model. When ``x`` is the DequantizeLinear of an act point (a Conv's output Q/DQ), onnxruntime first
gives each reader of that DequantizeLinear a copy of its own, so Sigmoid and Mul no longer read one
tensor, the fusion does not match and the SiLU runs as two float ops over two dequantized copies
(nudenet's 320n at W8A8: 136 DequantizeLinear nodes, 57 Sigmoid and 60 Mul on one thread). Written as
the QuickGelu it would have become, the SiLU reads its DequantizeLinear once. The values are the
same function, x·σ(x), that the torch side simulates for the Sigmoid and Mul of the canonical model.
"""
from __future__ import annotations

import onnx
from onnx import helper

from onnxflex.passes.control_flow import read_counts

FUSED_SILU = "QuickGelu"
SILU_DOMAIN = "com.microsoft"


def fuse_silus(g: onnx.GraphProto) -> int:
    """Mutates ``g`` (its nodes only, not nested graphs): each ``Mul(x, Sigmoid(x))`` (either input order)
    whose ``x`` a DequantizeLinear writes and whose Sigmoid output only that Mul reads (not a graph
    output) becomes ``QuickGelu(x, alpha=1)`` in SILU_DOMAIN under the Mul's name and output; the
    Sigmoid goes. Returns how many SiLUs it fused (the caller imports SILU_DOMAIN when any)."""
    producer = {o: n for n in g.node for o in n.output if o}
    readers = read_counts(g)
    outputs = {o.name for o in g.output}
    dropped: set[str] = set()  # the fused Sigmoids' outputs
    for node in g.node:
        sigmoid = _sigmoid_of(node, producer)
        if sigmoid is None or readers.get(sigmoid.output[0]) != 1 or sigmoid.output[0] in outputs:
            continue
        x = sigmoid.input[0]
        fused = helper.make_node(FUSED_SILU, [x], list(node.output), name=node.name, domain=SILU_DOMAIN, alpha=1.0)
        node.CopyFrom(fused)
        dropped.add(sigmoid.output[0])
    kept = [n for n in g.node if not (n.op_type == "Sigmoid" and n.output[0] in dropped)]
    del g.node[:]
    g.node.extend(kept)
    return len(dropped)


def _sigmoid_of(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The Sigmoid of a SiLU ``node`` = Mul(x, Sigmoid(x)) whose x a DequantizeLinear writes, else None."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    for k in (0, 1):
        sigmoid, x = producer.get(node.input[k]), node.input[1 - k]
        source = producer.get(x)
        if (sigmoid is not None and sigmoid.op_type == "Sigmoid" and sigmoid.input[0] == x
                and source is not None and source.op_type == "DequantizeLinear"):
            return sigmoid
    return None
