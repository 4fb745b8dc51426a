"""The rewrite behind the ``concat`` emitter stage (emit/qdq.py): a quantized Concat's float inputs quantized with its step.

When a Concat's output is an act point (it feeds an integer layer), every one of its elements is
rounded to that point's step and zero point; rounding each float input to the same step first gives
the same integers (QuantizeLinear is element-wise and the Concat only places the values), after which
the output QuantizeLinear changes nothing. So a QuantizeLinear → DequantizeLinear pair with the
output's parameters in front of each float input, read by the Concat alone, leaves what the torch side
simulates exact and lets onnxruntime run QLinearConcat on integers instead of a float Concat between
the dequantized inputs and the output QuantizeLinear (YOLO C2f/CSP blocks, SPPF, the neck's upsampled
joins). Inputs that are already dequantized (act points of their own) are left as they are: a
QLinearConcat reads inputs of different steps.
"""
from __future__ import annotations

import onnx
from onnx import helper

from onnxflex.graph import NameScope
from onnxflex.passes.control_flow import read_counts


def quantize_concat_inputs(g: onnx.GraphProto, scope: NameScope) -> int:
    """Mutates ``g`` (its nodes only, not nested graphs): for each Concat whose output only a
    QuantizeLinear with constant step and zero point reads, each input that is a run-time tensor not
    written by a DequantizeLinear is read through a new QuantizeLinear → DequantizeLinear with that
    step and zero point (the tensor's other readers keep the float tensor). Returns how many inputs it
    quantized; the caller sorts the nodes."""
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}
    quantizer = {n.input[0]: n for n in g.node if n.op_type == "QuantizeLinear"}
    readers = read_counts(g)  # a subgraph reading the Concat would see the quantized values
    outputs = {o.name for o in g.output}
    added: list[onnx.NodeProto] = []
    for node in g.node:
        q = quantizer.get(node.output[0]) if node.op_type == "Concat" else None
        if q is None or readers.get(node.output[0]) != 1 or node.output[0] in outputs:
            continue
        if len(q.input) < 3 or q.input[1] not in inits or q.input[2] not in inits:
            continue
        for k, name in enumerate(node.input):
            source = producer.get(name)
            if name in inits or (source is not None and source.op_type == "DequantizeLinear"):
                continue
            base = f"{node.name or node.output[0]}_input{k}"
            q_out, dq_out = scope.unique_name(f"{base}_quantized"), scope.unique_name(f"{base}_dequantized")
            added += [helper.make_node("QuantizeLinear", [name, q.input[1], q.input[2]], [q_out],
                                       name=scope.unique_name(f"{base}_QuantizeLinear")),
                      helper.make_node("DequantizeLinear", [q_out, q.input[1], q.input[2]], [dq_out],
                                       name=scope.unique_name(f"{base}_DequantizeLinear"))]
            node.input[k] = dq_out
    g.node.extend(added)
    return len(added) // 2
