"""partition: split the topologically sorted graph into reconstruction blocks.

A planning function, not a graph pass (no ``Pass``, the model is only read): it groups the layers and
activation points passes/select.py chose into the BlockPlan that capture and reconstruct walk.

granularity 'layer': a block starts at each weighted node and runs to the next one.
granularity 'block': a block ends wherever a single run-time tensor carries everything later nodes
need (a residual unit becomes one block); a residual unit without attention that follows one with
attention joins it, so one transformer layer (attention + MLP) is one block. Runs of nodes without
a quantized layer join the block before them.

Side tensors are computed only from constants, non-float graph inputs (token ids, attention masks)
and the shapes of graph inputs (position ids, causal masks built from Shape/Range). They do not count
as crossing a cut, except float ones that reach a weighted layer's input through side tensors alone
(token and position embeddings are activations). A block that reads a side tensor made in an earlier
block recomputes it: the side nodes it needs are repeated in the block, so block inputs stay
batch-major tensors that capture can store per sample. Every other node belongs to exactly one block.

A decoder's key/value cache inputs and outputs (passes/kv_cache.py) do not count as crossing a cut
either: each is read or made in one layer, so one decoder layer is one block. In onnxruntime-genai's
form of a decoder a SkipSimplifiedLayerNormalization's normalised output and its residual sum cross
each cut between sublayers together; the outputs of one such node count as one tensor.
"""
from __future__ import annotations

from typing import Callable

import onnx

from onnxflex.blocks import Block, BlockPlan, InnerPoint, QuantLayer
from onnxflex.errors import UnsupportedModelError
from onnxflex.graph import default_opset, graph_input_names
from onnxflex.passes.control_flow import reads, subgraphs, top_level_owner
from onnxflex.passes.kv_cache import cache_tensors
from onnxflex.placement import FLOAT_TYPES, declared_types

IsSupported = Callable[[onnx.NodeProto, int], bool]  # (node, default-domain opset): runs in torch

SHAPE_OPS = {"Shape", "Size"}
ATTENTION_OPS = {"Softmax", "GroupQueryAttention"}
RESIDUAL_OPS = {"Add", "Sum", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization"}
# onnxruntime's norms that also return the residual sum they normalise: their normalised output and
# that sum cross a decoder layer's cut together, and count as one tensor there
RESIDUAL_NORMS = {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"}
# never repeated in a later block: a second run would draw other values, or a subgraph may read any tensor
NOT_RECOMPUTED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                  "Bernoulli", "If", "Loop", "Scan"}


def partition(model: onnx.ModelProto, layers: tuple[QuantLayer, ...], act_points: tuple[str, ...],
              granularity: str, is_supported: IsSupported, warnings: tuple[str, ...] = (),
              inner_layers: tuple[QuantLayer, ...] = (), inner_points: tuple[InnerPoint, ...] = ()) -> BlockPlan:
    """The BlockPlan (see the module docstring). ``inner_layers``/``inner_points`` (passes/select_inner.py)
    go to the block that holds their control-flow node."""
    nodes = list(model.graph.node)
    if not layers and not inner_layers:
        raise UnsupportedModelError(
            "the model has no quantizable layer (Conv, ConvTranspose, Gemm, MatMul or, for onnxruntime, LSTM "
            "with a constant weight that is not excluded); nothing to quantize")
    layer_of = {layer.node: layer for layer in layers}
    layers_of: dict[str, list[QuantLayer]] = {}  # an LSTM is two layers (W and R) of one node
    for layer in layers:
        layers_of.setdefault(layer.node, []).append(layer)
    side = side_tensors(model, set(layer_of))
    uncounted = (side - _side_activations(model, side, layers)) | cache_tensors(model)
    starts = _layer_starts(nodes, layer_of) if granularity == "layer" else _single_tensor_cuts(model, uncounted)
    segments = _merge_weightless([nodes[a:b] for a, b in zip(starts, starts[1:] + [len(nodes)])], layer_of)
    if granularity == "block":
        segments = _join_transformer_sublayers(segments, model)
    repeated = [_side_producers(model, seg, side) for seg in segments]
    opset = default_opset(model)
    blocks = []
    inputs_of = [_block_inputs(model, rep + seg) for rep, seg in zip(repeated, segments)]
    first_reader = _first_readers(model, inputs_of)
    graph_outputs = {o.name for o in model.graph.output}
    top = top_level_owner(model)  # a layer nested two subgraphs deep goes with its top-level node
    for k, seg in enumerate(segments):
        run = repeated[k] + seg
        names = [n.name for n in run]
        produced = {o for n in seg for o in n.output if o}
        later = {i for ins in inputs_of[k + 1:] for i in ins} | graph_outputs
        outputs = tuple(o for n in seg for o in n.output if o and o in later)
        points = tuple(p for p in act_points if p in produced or first_reader.get(p) == k)
        unsupported = tuple(_unsupported(n, opset, is_supported) for n in run if not is_supported(n, opset))
        owned = {n.name for n in seg}
        blocks.append(Block(f"block{k}", tuple(names), inputs_of[k], outputs,
                            tuple(l for n in seg for l in layers_of.get(n.name, ()))
                            + tuple(l for l in inner_layers if top[l.owner] in owned), points, unsupported,
                            tuple(p for p in inner_points if top[p.owner] in owned)))
    return BlockPlan(model, tuple(blocks), act_points, warnings)


def side_tensors(model: onnx.ModelProto, weighted: set[str]) -> set[str]:
    """Run-time tensors computed from constants, non-float graph inputs and graph input shapes only.

    A weighted node's outputs are never side tensors (its layer belongs to one block); a Shape of a
    tensor computed inside the graph is not one either (recomputing it would need that tensor).
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    graph_inputs = set(graph_input_names(model))
    side = {i.name for i in g.input
            if i.name in graph_inputs and i.type.tensor_type.elem_type not in FLOAT_TYPES}
    for node in g.node:
        if node.name in weighted or node.op_type in NOT_RECOMPUTED or node.domain not in ("", "ai.onnx"):
            continue
        args = [i for i in node.input if i]
        if not args:
            continue
        if node.op_type in SHAPE_OPS:
            ok = args[0] in graph_inputs or args[0] in side
        else:
            ok = all(i in side or i in inits for i in args)
        if ok:
            side.update(o for o in node.output if o)
    return side


def _side_activations(model: onnx.ModelProto, side: set[str], layers: tuple[QuantLayer, ...]) -> set[str]:
    """Float side tensors from which a layer's input is computed through float side tensors only."""
    typed = declared_types(model)

    def float_side(name: str) -> bool:
        return name in side and typed.get(name, onnx.TensorProto.FLOAT) in FLOAT_TYPES

    producer = {o: n for n in model.graph.node for o in n.output if o}
    found: set[str] = set()
    stack = [layer.input for layer in layers if float_side(layer.input)]
    while stack:
        name = stack.pop()
        if name in found:
            continue
        found.add(name)
        if name in producer:
            stack += [i for i in producer[name].input if float_side(i)]
    return found


def _layer_starts(nodes, layer_of) -> list[int]:
    starts = [i for i, n in enumerate(nodes) if n.name in layer_of]
    return [0] + starts[1:]


def _single_tensor_cuts(model: onnx.ModelProto, uncounted: set[str]) -> list[int]:
    """Positions p where exactly one run-time tensor not in ``uncounted`` (or the outputs of one residual
    norm, RESIDUAL_NORMS) crosses from nodes[:p] to nodes[p:]."""
    nodes = list(model.graph.node)
    inits = {t.name for t in model.graph.initializer}
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in reads(node):  # a subgraph's outer reads too: the tensor lives until the If/Loop runs
            if name not in inits:
                last_use[name] = i
    for out in model.graph.output:
        last_use[out.name] = len(nodes)
    born = {name: -1 for name in graph_input_names(model)}
    born.update({o: i for i, n in enumerate(nodes) for o in n.output if o})
    group = {o: n.name for n in nodes if n.op_type in RESIDUAL_NORMS for o in n.output if o}
    spans: dict[str, tuple[int, int]] = {}  # tensor, or residual norm node -> (born, last use)
    for tensor, b in born.items():
        u = last_use.get(tensor, -1)
        if u > b and tensor not in uncounted:
            key = group.get(tensor, tensor)
            spans[key] = (b, max(u, spans.get(key, (b, u))[1]))
    delta = [0] * (len(nodes) + 2)
    for b, u in spans.values():
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
    if leading and not merged:  # only layers inside subgraphs: one block holds everything
        merged.append(leading)
    return merged


def _join_transformer_sublayers(segments, model):
    """A residual segment without attention (the MLP) joins the segment with attention just before it,
    once: the two sublayers of a transformer layer share one reconstruction block."""
    merged, joinable = [], False
    for seg in segments:
        attention = any(n.op_type in ATTENTION_OPS for n in seg)
        if merged and joinable and not attention and _is_residual(model, seg):
            merged[-1] = merged[-1] + seg
            joinable = False
            continue
        merged.append(seg)
        joinable = attention
    return merged


def _is_residual(model, seg) -> bool:
    """True when an Add in the segment sums a tensor from before the segment (the skip) with one made in it."""
    inits = {t.name for t in model.graph.initializer}
    produced = {o for n in seg for o in n.output if o}
    for node in seg:
        if node.op_type in RESIDUAL_OPS:
            outside = [i for i in node.input if i and i not in produced and i not in inits]
            if outside and any(i in produced for i in node.input):
                return True
    return False


def _unsupported(node: onnx.NodeProto, opset: int, is_supported: IsSupported) -> str:
    """``node`` named for the fallback warning; for an If, Loop or Scan also the first node of its
    subgraphs (at any depth) that has no torch converter, the one the user would exclude or report."""
    inner = next((n for _, g in subgraphs(node) for n in g.node if not is_supported(n, opset)), None)
    where = f", for {_unsupported(inner, opset, is_supported)} inside it" if inner is not None else ""
    return f"{node.op_type} (node {node.name!r}){where}"


def _side_producers(model, seg, side) -> list[onnx.NodeProto]:
    """The side nodes, in graph order, that recompute the side tensors ``seg`` reads but does not make."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    own = {n.name for n in seg}
    produced = {o for n in seg for o in n.output if o}
    needed: set[str] = set()
    stack = [i for n in seg for i in n.input if i in side and i not in produced and i in producer]
    while stack:
        node = producer[stack.pop()]
        if node.name in own or node.name in needed:
            continue
        needed.add(node.name)
        stack += [i for i in node.input if i in side and i in producer]
    return [n for n in model.graph.node if n.name in needed]


def _block_inputs(model, run) -> tuple[str, ...]:
    inits = {t.name for t in model.graph.initializer}
    produced = {o for n in run for o in n.output if o}
    inputs: list[str] = []
    for node in run:
        for name in reads(node):
            if name not in produced and name not in inits and name not in inputs:
                inputs.append(name)
    return tuple(inputs)


def _first_readers(model, inputs_of) -> dict[str, int]:
    """Graph input name → index of the first block that reads it."""
    graph_inputs = set(graph_input_names(model))
    first: dict[str, int] = {}
    for k, inputs in enumerate(inputs_of):
        for name in inputs:
            if name in graph_inputs:
                first.setdefault(name, k)
    return first
