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
state (initial_h, initial_c) and graph outputs made from its final state (Y_h, Y_c), through the
slicing and stacking ops exporters put between them, with every tensor on those paths. Rounding such a
tensor compounds at every call, so none of them is an activation quant point.
"""
from __future__ import annotations

import onnx

from onnxflex.blocks import QuantLayer
from onnxflex.config import QuantConfig
from onnxflex.graph import node_attr
from onnxflex.passes.control_flow import subgraphs
from onnxflex.passes.select import FLOAT_TYPES
from onnxflex.runtimes.base import Target

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
INTEGER_LSTM = "DynamicQuantizeLSTM"
STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}  # initial_h, initial_c
STATE_OUTPUTS = {"LSTM": (1, 2), "GRU": (1,), "RNN": (1,)}  # Y_h, Y_c
WEIGHT_AXIS = 1  # W [D, 4H, K], R [D, 4H, H]: one step per gate row
# ops that move state between the graph's inputs/outputs and a recurrent node without computing on it
STATE_PATH_OPS = {"Slice", "Split", "Gather", "Squeeze", "Unsqueeze", "Reshape", "Concat", "Transpose",
                  "Identity", "Cast", "Flatten", "Expand"}


def recurrent_layers(model: onnx.ModelProto, target: Target, config: QuantConfig
                     ) -> tuple[tuple[QuantLayer, ...], tuple[str, ...]]:
    """(the QuantLayers of the LSTMs ``target`` runs with integer kernels — W then R per node, in graph
    order —, one warning per recurrent node that stays float, subgraphs included)."""
    inits = {t.name: t for t in model.graph.initializer}
    layers: list[QuantLayer] = []
    warnings: list[str] = []
    for node in model.graph.node:
        if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
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
    warnings += [f"node {node.name!r} ({node.op_type}) inside a subgraph of {owner!r} stays float: recurrent "
                 "layers are quantized at the top level only" for owner, node in _nested(model.graph)]
    return tuple(layers), tuple(warnings)


def _float_reason(node: onnx.NodeProto, inits: dict, target: Target, config: QuantConfig) -> str:
    """Why ``node`` cannot become an integer kernel on ``target`` ('' when it can)."""
    if node.op_type not in target.recurrent_ops:
        return f"{target.name} has no integer {node.op_type} kernel; its weights and state stay FP32"
    if config.abits == 0:
        return (f"its integer kernel ({INTEGER_LSTM}) quantizes activations at run time, and --abits 0 asks for "
                "weight-only; give --abits 8 to quantize it")
    if node_attr(node, "layout", 0):
        return f"layout=1 (batch-major) has no {INTEGER_LSTM} form; export it with layout=0 (sequence-major)"
    weights = [node.input[k] if len(node.input) > k else "" for k in (1, 2)]
    if not all(w in inits and inits[w].data_type in FLOAT_TYPES for w in weights):
        return "its W and R are not float initializers (computed at run time), so there is nothing to quantize"
    return ""


def _nested(g: onnx.GraphProto, owner: str = "") -> list[tuple[str, onnx.NodeProto]]:
    found = []
    for node in g.node:
        if owner and node.op_type in RECURRENT_OPS:
            found.append((owner, node))
        for _, sub in subgraphs(node):
            found += _nested(sub, owner or node.name)
    return found


def state_tensors(model: onnx.ModelProto) -> set[str]:
    """Every tensor of a recurrent state path of the top-level graph (see the module docstring)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    graph_inputs = {i.name for i in g.input}
    found: set[str] = set()
    for node in g.node:
        if node.op_type not in RECURRENT_OPS:
            continue
        for k in STATE_INPUTS[node.op_type]:
            if len(node.input) > k and node.input[k]:
                found |= _upstream(node.input[k], producer, graph_inputs)
        for k in STATE_OUTPUTS[node.op_type]:
            if len(node.output) > k and node.output[k]:
                found |= _downstream(node.output[k], users, {o.name for o in g.output})
    return found


def _upstream(tensor: str, producer: dict, graph_inputs: set[str]) -> set[str]:
    """The path from graph inputs to ``tensor`` through STATE_PATH_OPS, if a graph input starts it."""
    path, stack, reached = set(), [tensor], False
    while stack:
        name = stack.pop()
        if name in path:
            continue
        path.add(name)
        reached |= name in graph_inputs
        node = producer.get(name)
        if node is not None and node.op_type in STATE_PATH_OPS:
            stack += [i for i in node.input[:1] if i]  # the data input; the rest are indices and shapes
            if node.op_type == "Concat":
                stack += [i for i in node.input[1:] if i]
    return path if reached else set()


def _downstream(tensor: str, users: dict, graph_outputs: set[str]) -> set[str]:
    """The tensors from ``tensor`` through STATE_PATH_OPS from which a graph output is reached (a
    branch that goes elsewhere, such as Y_h read by a classifier, is not state)."""
    memo: dict[str, bool] = {}
    path: set[str] = set()

    def leads_out(name: str) -> bool:
        if name not in memo:
            memo[name] = False  # a cycle cannot happen in a valid graph; this only guards the recursion
            nexts = [o for n in users.get(name, []) if n.op_type in STATE_PATH_OPS for o in n.output if o]
            found = [o for o in nexts if leads_out(o)]
            memo[name] = name in graph_outputs or bool(found)
            if memo[name]:
                path.add(name)
        return memo[name]

    leads_out(tensor)
    return path
