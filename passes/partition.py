"""partition: split the topologically sorted graph into reconstruction blocks.

granularity 'layer': a block starts at each weighted node and runs to the next one.
granularity 'block': a block ends wherever a single run-time tensor carries everything later nodes
need (a residual unit becomes one block). Runs of nodes without a quantized layer join the block
before them, so every node of the graph belongs to exactly one block.
"""
from __future__ import annotations

from typing import Callable

import onnx

from onnxflex.blocks import Block, BlockPlan, QuantLayer
from onnxflex.errors import UnsupportedModelError
from onnxflex.graph import default_opset, graph_input_names

IsSupported = Callable[[str, int, str], bool]


def partition(model: onnx.ModelProto, layers: tuple[QuantLayer, ...], act_points: tuple[str, ...],
              granularity: str, is_supported: IsSupported, warnings: tuple[str, ...] = ()) -> BlockPlan:
    nodes = list(model.graph.node)
    if not layers:
        raise UnsupportedModelError(
            "the model has no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with a constant weight "
            "that is not excluded); nothing to quantize")
    layer_of = {layer.node: layer for layer in layers}
    starts = _layer_starts(nodes, layer_of) if granularity == "layer" else _single_tensor_cuts(model)
    segments = _merge_weightless([nodes[a:b] for a, b in zip(starts, starts[1:] + [len(nodes)])], layer_of)
    opset = default_opset(model)
    blocks = []
    first_reader = _first_readers(model, segments)
    for k, seg in enumerate(segments):
        names = [n.name for n in seg]
        produced = {o for n in seg for o in n.output if o}
        inputs = _block_inputs(model, seg, produced)
        later = {i for s in segments[k + 1:] for n in s for i in n.input} | {o.name for o in model.graph.output}
        outputs = tuple(o for n in seg for o in n.output if o and o in later)
        points = tuple(p for p in act_points if p in produced or first_reader.get(p) == k)
        unsupported = tuple(f"{n.op_type} (node {n.name!r})" for n in seg
                            if not is_supported(n.op_type, opset, n.domain))
        blocks.append(Block(f"block{k}", tuple(names), inputs, outputs,
                            tuple(layer_of[n] for n in names if n in layer_of), points, unsupported))
    return BlockPlan(model, tuple(blocks), act_points, warnings)


def _layer_starts(nodes, layer_of) -> list[int]:
    starts = [i for i, n in enumerate(nodes) if n.name in layer_of]
    return [0] + starts[1:]


def _single_tensor_cuts(model: onnx.ModelProto) -> list[int]:
    """Positions p where exactly one run-time tensor crosses from nodes[:p] to nodes[p:]."""
    nodes = list(model.graph.node)
    inits = {t.name for t in model.graph.initializer}
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name and name not in inits:
                last_use[name] = i
    for out in model.graph.output:
        last_use[out.name] = len(nodes)
    born = {name: -1 for name in graph_input_names(model)}
    born.update({o: i for i, n in enumerate(nodes) for o in n.output if o})
    delta = [0] * (len(nodes) + 2)
    for tensor, b in born.items():
        u = last_use.get(tensor, -1)
        if u > b:
            delta[b + 1] += 1
            delta[u + 1] -= 1
    cuts, live = [0], 0
    for p in range(len(nodes)):
        live += delta[p]
        if p > 0 and live == 1:
            cuts.append(p)
    return cuts


def _merge_weightless(segments, layer_of):
    """Segments without a quantized layer join the previous segment (leading ones join the first
    segment that has one), so a layer keeps its trailing activation and pooling."""
    merged, leading = [], []
    for seg in segments:
        if any(n.name in layer_of for n in seg):
            merged.append(leading + seg)
            leading = []
        elif merged:
            merged[-1] = merged[-1] + seg
        else:
            leading += seg
    return merged


def _block_inputs(model, seg, produced) -> tuple[str, ...]:
    inits = {t.name for t in model.graph.initializer}
    inputs: list[str] = []
    for node in seg:
        for name in node.input:
            if name and name not in produced and name not in inits and name not in inputs:
                inputs.append(name)
    return tuple(inputs)


def _first_readers(model, segments) -> dict[str, int]:
    """Graph input name → index of the first segment that reads it."""
    graph_inputs = set(graph_input_names(model))
    first: dict[str, int] = {}
    for k, seg in enumerate(segments):
        for node in seg:
            for name in node.input:
                if name in graph_inputs:
                    first.setdefault(name, k)
    return first
