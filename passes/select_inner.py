"""Layers and activation points inside the subgraphs of If/Loop/Scan nodes, at any depth.

A Conv/ConvTranspose/Gemm/MatMul in a subgraph of a control-flow node (a top-level one, or one nested in
another's subgraph), with a float weight initializer of that subgraph (canonicalize copies outer weights
in, under names of their own), becomes a QuantLayer with ``owner``/``graph`` naming that innermost node
and graph attribute. Its input (and, for fusing targets, its output after one absorbed activation) is an
activation point: an InnerPoint of the innermost enclosing subgraph that defines the tensor, or a
top-level point when it is a top-level tensor the subgraph reads (explicit_outer_reads made it a
top-level Identity output).
"""
from __future__ import annotations

import onnx

from onnxflex.blocks import InnerPoint, QuantLayer
from onnxflex.options import PlanOptions
from onnxflex.passes.control_flow import CONTROL_FLOW, Scope, control_flow_nodes, subgraphs
from onnxflex.passes.recurrent import inner_recurrent_layers
from onnxflex.passes.select import check_float32
from onnxflex.placement import QUANTIZABLE_TYPES, channel_axis
from onnxflex.runtimes.base import Target



def subgraph_of(model: onnx.ModelProto, owner: str, graph: str) -> onnx.GraphProto:
    """The graph attribute ``graph`` of the control-flow node ``owner`` (at any depth)."""
    node = next(n for n, _ in control_flow_nodes(model) if n.name == owner)
    return next(g for name, g in subgraphs(node) if name == graph)


def initializers_of(model: onnx.ModelProto, layer: QuantLayer) -> dict[str, onnx.TensorProto]:
    """Initializers of the graph that holds ``layer``: the top-level graph, or its subgraph."""
    g = subgraph_of(model, layer.owner, layer.graph) if layer.owner else model.graph
    return {t.name: t for t in g.initializer}


def select_inner(model: onnx.ModelProto, target: Target, config: PlanOptions
                 ) -> tuple[tuple[QuantLayer, ...], tuple[InnerPoint, ...], tuple[str, ...]]:
    """(inner layers, inner points, top-level points the inner layers read), in graph order, a subgraph's
    own before those of the subgraphs nested in it."""
    layers: list[QuantLayer] = []
    inner: list[InnerPoint] = []
    outer: list[str] = []
    for node, scope in control_flow_nodes(model):
        for attr, g in subgraphs(node):
            found = _layers_in(g, node.name, attr, target, config)
            layers += found + inner_recurrent_layers(g, node.name, attr, target, config)  # LSTM X: no point
            if config.abits == 0:
                continue
            here = scope + [(g, node.name, attr)]
            for tensor in _points(g, found, target):
                where = next(((owner, a) for sub, owner, a in reversed(here) if tensor in _defined(sub)), None)
                if where is not None and InnerPoint(tensor, *where) not in inner:
                    inner.append(InnerPoint(tensor, *where))
                elif where is None and tensor not in outer:
                    outer.append(tensor)
    return tuple(layers), tuple(inner), tuple(outer)


def _defined(g: onnx.GraphProto) -> set[str]:
    return {i.name for i in g.input} | {o for n in g.node for o in n.output if o}


def _layers_in(g: onnx.GraphProto, owner: str, attr: str, target: Target, config: PlanOptions) -> list[QuantLayer]:
    inits = {t.name: t for t in g.initializer}
    found = []
    for node in g.node:
        if node.op_type not in target.weighted_ops or config.keeps_float(node.name, node.op_type):
            continue
        if len(node.input) < 2 or node.input[1] not in inits or inits[node.input[1]].data_type not in QUANTIZABLE_TYPES:
            continue
        check_float32(node, inits[node.input[1]])
        axis = channel_axis(node, len(inits[node.input[1]].dims))
        if axis is None:
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        found.append(QuantLayer(node.name, node.op_type, node.input[1], axis, node.input[0], bias,
                                config.bits_for(node.name), 0, owner, attr))
    return found


def _points(g: onnx.GraphProto, layers: list[QuantLayer], target: Target) -> list[str]:
    """Each layer's input, and for fusing targets its output after one absorbed activation."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    by_name = {n.name: n for n in g.node}
    points: list[str] = []
    for layer in layers:
        candidates = [layer.input]
        if target.quantize_outputs:
            out = by_name[layer.node].output[0]
            follow = users.get(out, [])
            if out not in outputs and len(follow) == 1 and follow[0].op_type in target.absorb:
                out = follow[0].output[0]
            candidates.append(out)
        points += [t for t in candidates if t not in points]
    return points
