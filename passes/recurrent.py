"""Recurrent layers (LSTM, GRU, RNN) and the recurrent state a streaming model carries between calls.

An ONNX LSTM whose W and R are float initializers becomes two QuantLayers (one per weight, both naming
the node) on targets that run it with integer kernels (``Target.recurrent_ops``): onnxruntime's
com.microsoft DynamicQuantizeLSTM takes W and R as int8 with one step per gate row and quantizes X and
the hidden state itself at run time (uint8, range of each call). The weights W [D, 4H, K] and
R [D, 4H, H] are quantized along axis 1 (the 4H gate rows of iofc order), one step per row shared by
the D directions of a bidirectional LSTM. Their input X gets no Q/DQ of its own.

Where DynamicQuantizeLSTM cannot express a node (``layout=1``, weights that are not initializers) or
the run is weight-only (``--abits 0``: that kernel quantizes activations), the LSTM stays float with a
warning naming it. GRU and RNN stay float on every target (onnxruntime has no integer kernel for them),
with a warning per node.

State tensors are what a streaming model reads back: graph inputs that reach a recurrent node's initial
state (initial_h, initial_c), and its final state (Y_h, Y_c) where it reaches a graph output, through
the slicing and stacking ops exporters put between them, with every tensor those ops make of them. Rounding such a
tensor compounds at every call, so none of them is an activation quant point.
"""
from __future__ import annotations

import onnx

from onnxflex.blocks import QuantLayer
from onnxflex.graph import DEFAULT_DOMAINS, node_attr
from onnxflex.options import PlanOptions
from onnxflex.passes.control_flow import subgraphs
from onnxflex.placement import QUANTIZABLE_TYPES
from onnxflex.runtimes.base import RECURRENT_OPS, Target

INTEGER_LSTM = "DynamicQuantizeLSTM"
STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}  # initial_h, initial_c
STATE_OUTPUTS = {"LSTM": (1, 2), "GRU": (1,), "RNN": (1,)}  # Y_h, Y_c
WEIGHT_AXIS = 1  # W [D, 4H, K], R [D, 4H, H]: one step per gate row
# ops that move state between the graph's inputs/outputs and a recurrent node without computing on it
STATE_PATH_OPS = {"Slice", "Split", "Gather", "Squeeze", "Unsqueeze", "Reshape", "Concat", "Transpose",
                  "Identity", "Cast", "Flatten", "Expand"}


def recurrent_layers(model: onnx.ModelProto, target: Target, config: PlanOptions
                     ) -> tuple[tuple[QuantLayer, ...], tuple[str, ...]]:
    """(the QuantLayers of the LSTMs ``target`` runs with integer kernels — W then R per node, in graph
    order —, one warning per recurrent node that stays float, subgraphs included)."""
    inits = {t.name: t for t in model.graph.initializer}
    layers: list[QuantLayer] = []
    warnings: list[str] = []
    for node in model.graph.node:
        if node.op_type not in RECURRENT_OPS or node.domain not in DEFAULT_DOMAINS:
            continue
        if config.keeps_float(node.name, node.op_type):
            continue
        reason = _float_reason(node, inits, target, config)
        if reason:
            warnings.append(f"node {node.name!r} ({node.op_type}) stays float: {reason}")
            continue
        bits = config.bits_for(node.name)
        layers += [QuantLayer(node.name, node.op_type, node.input[k], WEIGHT_AXIS, node.input[0], None, bits)
                   for k in (1, 2)]
    for owner, node, g in _nested(model.graph):
        reason = _float_reason(node, {t.name: t for t in g.initializer}, target, config)
        if reason and not config.keeps_float(node.name, node.op_type):
            warnings.append(f"node {node.name!r} ({node.op_type}) inside a subgraph of {owner!r} stays float: "
                            f"{reason}")
    return tuple(layers), tuple(warnings)


def inner_recurrent_layers(g: onnx.GraphProto, owner: str, attr: str, target: Target, config: PlanOptions
                           ) -> list[QuantLayer]:
    """The QuantLayers (W then R) of the LSTMs directly in subgraph ``attr`` of control-flow node ``owner``
    that ``target`` runs with integer kernels, their weights initializers of ``g``; no warnings
    (recurrent_layers names those that stay float)."""
    inits = {t.name: t for t in g.initializer}
    return [QuantLayer(node.name, node.op_type, node.input[k], WEIGHT_AXIS, node.input[0], None,
                       config.bits_for(node.name), 0, owner, attr)
            for node in g.node if node.op_type in RECURRENT_OPS and node.domain in DEFAULT_DOMAINS
            and not config.keeps_float(node.name, node.op_type) and not _float_reason(node, inits, target, config)
            for k in (1, 2)]


def _float_reason(node: onnx.NodeProto, inits: dict, target: Target, config: PlanOptions) -> str:
    """Why ``node`` cannot become an integer kernel on ``target`` ('' when it can)."""
    if node.op_type not in target.recurrent_ops:
        return f"{target.name} has no integer {node.op_type} kernel; its weights and state stay FP32"
    if config.abits == 0:
        return (f"its integer kernel ({INTEGER_LSTM}) quantizes activations at run time, and --abits 0 asks for "
                "weight-only; give --abits 8 to quantize it")
    if node_attr(node, "layout", 0):
        return f"layout=1 (batch-major) has no {INTEGER_LSTM} form; export it with layout=0 (sequence-major)"
    weights = [node.input[k] if len(node.input) > k else "" for k in (1, 2)]
    if not all(w in inits and inits[w].data_type in QUANTIZABLE_TYPES for w in weights):
        return "its W and R are not float initializers (computed at run time), so there is nothing to quantize"
    return ""


def _nested(g: onnx.GraphProto, owner: str = "") -> list[tuple[str, onnx.NodeProto, onnx.GraphProto]]:
    """(top-level owner, recurrent node, the subgraph holding it) for every recurrent node in a subgraph."""
    found = []
    for node in g.node:
        if owner and node.op_type in RECURRENT_OPS:
            found.append((owner, node, g))
        for _, sub in subgraphs(node):
            found += _nested(sub, owner or node.name)
    return found


def state_tensors(model: onnx.ModelProto) -> set[str]:
    """The recurrent state of the top-level graph (module docstring): from each graph input that reaches
    a recurrent node's initial state, and from each final state (Y_h, Y_c) that reaches a graph output,
    every tensor they flow into through STATE_PATH_OPS."""
    g = model.graph
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    recurrent = [n for n in g.node if n.op_type in RECURRENT_OPS]
    state_in = {n.input[k] for n in recurrent for k in STATE_INPUTS[n.op_type] if len(n.input) > k and n.input[k]}
    finals = [n.output[k] for n in recurrent for k in STATE_OUTPUTS[n.op_type] if len(n.output) > k and n.output[k]]
    outputs = {o.name for o in g.output}
    found: set[str] = set()
    for start in [i.name for i in g.input] + finals:
        reach = flows_into(start, users)
        ends = outputs if start in finals else state_in
        if reach & ends:
            found |= reach
    return found


def flows_into(tensor: str, users: dict[str, list[onnx.NodeProto]], ops: set[str] = STATE_PATH_OPS) -> set[str]:
    """``tensor`` and every tensor made from it through ``ops`` (``users``: tensor -> the nodes reading it)."""
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack += [o for n in users.get(name, []) if n.op_type in ops for o in n.output if o]
    return seen
