"""Emit a QDQ model: integer weight initializers with DequantizeLinear, int32 biases, and
QuantizeLinear/DequantizeLinear pairs on activation quant points, for the target's placement rules.

Each stage takes (model, params, target) and returns the model; stages mutate the copy ``emit`` makes.
Parameters are keyed by name and names are unique across scopes (canonicalize), so each weight, bias
and act point is placed in the graph that holds it: the top level or an If branch / Loop / Scan body.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxflex.emit.concat import quantize_concat_inputs
from onnxflex.emit.nbits import matmul_nbits, nbits_reader
from onnxflex.emit.pack import int4_initializer
from onnxflex.emit.silu import SILU_DOMAIN, fuse_silus
from onnxflex.emit.softmax import SOFTMAX_OPSET, softmax_before_transpose
from onnxflex.errors import UnsupportedModelError
from onnxflex.extdata import copy_except, with_payloads, without_payloads
from onnxflex.graph import NameScope, default_opset, node_attr, set_default_opset
from onnxflex.passes.control_flow import reads, rename_outer_reads, subgraphs
from onnxflex.placement import BLOCKED_OPSET
from onnxflex.qparams import QuantizedWeight, QuantParams
from onnxflex.registry import Registry
from onnxflex.runtimes.base import Target

Stage = Callable[[onnx.ModelProto, QuantParams, Target], onnx.ModelProto]
STAGES: Registry[Stage] = Registry("emitter stage")
ORDER = ("recurrent", "weights", "biases", "activations", "concat", "silu", "softmax", "versions")
NP_OF = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}


def emit(model: onnx.ModelProto, params: QuantParams, target: Target) -> onnx.ModelProto:
    """A new QDQ model from the canonical float ``model``; ``model`` itself is left unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in ORDER:
        out = STAGES.get(name)(out, params, target)
    # The canonical model carries the shapes onnx inferred for every tensor. They are not written out:
    # onnxruntime 1.31 on CPU runs a graph whose intermediate tensors are declared with symbolic shapes
    # 10-15 % slower than the same graph without them (bundled LM at W8A8: 15.1 against 13.1 ms at
    # batch 32 on one thread; the FP32 model with inferred shapes is 10 % slower than as exported).
    del out.graph.value_info[:]
    return out


def all_graphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``g`` and every graph nested in its nodes' GRAPH/GRAPHS attributes, outermost first."""
    found = [g]
    for node in g.node:
        for _, sub in subgraphs(node):
            found += all_graphs(sub)
    return found


def _dq_node(g: onnx.GraphProto, scope, base: str, ints: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
             axis: int | None) -> str:
    """Adds integer/scale/zero-point initializers and a DequantizeLinear to ``g``; returns its output name."""
    q_name, s_name, z_name = (scope.unique_name(f"{base}_{s}") for s in ("quantized", "scale", "zero_point"))
    g.initializer.extend([numpy_helper.from_array(ints, q_name), numpy_helper.from_array(scale, s_name),
                          numpy_helper.from_array(zero_point, z_name)])
    out = scope.unique_name(f"{base}_dequantized")
    attrs = {"axis": axis} if axis is not None else {}
    g.node.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out],
                                   name=scope.unique_name(f"{base}_DequantizeLinear"), **attrs))
    return out


class Wiring:
    """Which nodes of one graph read each tensor, and which hold subgraphs, taken once per stage, so that
    rewiring a tensor's reads visits its readers instead of every node of the graph (a detector's 148
    activation pairs visited its ~600 nodes each). The index stays right while a stage runs: the nodes
    a stage adds read only its new names, and a rename moves the readers to the new name."""

    def __init__(self, g: onnx.GraphProto) -> None:
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for name in dict.fromkeys(node.input):
                self.readers.setdefault(name, []).append(node)
        self.nested = [node for node in g.node if next(subgraphs(node), None) is not None]

    def rename_reads(self, old: str, new: str, keep_dequantize: bool = False) -> None:
        """Reads of ``old`` by the graph's nodes (but DequantizeLinear nodes with ``keep_dequantize``)
        and by the graphs nested in them become reads of ``new``."""
        kept, moved = [], []
        for node in self.readers.pop(old, []):
            if keep_dequantize and node.op_type == "DequantizeLinear":
                kept.append(node)
                continue
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
            moved.append(node)
        if kept:
            self.readers[old] = kept
        self.readers.setdefault(new, []).extend(moved)
        for node in self.nested:
            for _, sub in subgraphs(node):
                rename_outer_reads(sub, old, new)


def _replace_initializer_uses(g: onnx.GraphProto, wiring: Wiring, old: str, new: str) -> None:
    """Reads of ``g``'s initializer ``old`` (by its nodes and by graphs nested in them) become ``new``;
    ``wiring`` is ``g``'s."""
    wiring.rename_reads(old, new, keep_dequantize=True)
    _drop_initializer(g, old)


def _blocked_dq_node(g: onnx.GraphProto, scope, base: str, qw: QuantizedWeight) -> str:
    """Adds a packed INT4 initializer (2-4 bit values in the 4-bit container), its float32 scale of
    blocked shape and a DequantizeLinear(axis, block_size) with no zero point (symmetric: 0) to ``g``;
    an asymmetric weight is UINT4 with a UINT4 zero point of the scale's shape instead. 5-8 bit values
    (a model's head, select.head_nodes) take int8 / uint8 containers the same way. Returns the
    DequantizeLinear's output name. onnxruntime fuses it with a MatMul reading it into MatMulNBits
    (bits 4 or 8; with zero_points when asymmetric)."""
    q_name, s_name = scope.unique_name(f"{base}_quantized"), scope.unique_name(f"{base}_scale")

    def integers(values: np.ndarray, name: str) -> onnx.TensorProto:
        if qw.bits <= 4:
            return int4_initializer(values, name, signed=not qw.asymmetric)
        return numpy_helper.from_array(values.astype(np.uint8 if qw.asymmetric else np.int8), name)

    g.initializer.extend([integers(qw.ints, q_name), numpy_helper.from_array(qw.scale.astype(np.float32), s_name)])
    inputs = [q_name, s_name]
    if qw.asymmetric:
        inputs.append(scope.unique_name(f"{base}_zero_point"))
        g.initializer.append(integers(qw.zero_point, inputs[-1]))
    out = scope.unique_name(f"{base}_dequantized")
    g.node.append(helper.make_node("DequantizeLinear", inputs, [out],
                                   name=scope.unique_name(f"{base}_DequantizeLinear"), axis=qw.axis,
                                   block_size=qw.block_size))
    return out


@STAGES.register("recurrent")
def quantize_recurrent(model, params, target):
    """Each LSTM (top level or in a subgraph) whose W and R are both quantized becomes com.microsoft
    DynamicQuantizeLSTM (passes/recurrent.py) under the LSTM's name, with its other inputs and attributes as they were
    (``layout`` is 0 or absent: the pass keeps layout=1 LSTMs float)."""
    scope = NameScope.of(model)
    replaced = [name for g in all_graphs(model.graph) for name in _integer_lstms(g, scope, params)]
    if replaced:
        _import_domain(model, "com.microsoft")
    return model


def _import_domain(model: onnx.ModelProto, domain: str) -> None:
    """Mutates ``model``: imports opset 1 of ``domain`` unless it already imports a version of it."""
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def _integer_lstms(g: onnx.GraphProto, scope, params: QuantParams) -> list[str]:
    """Mutates ``g``: its LSTMs with quantized W and R become DynamicQuantizeLSTM; returns the float
    weights replaced."""
    from onnxflex.passes.recurrent import INTEGER_LSTM

    inits = {t.name for t in g.initializer}
    replaced: list[str] = []
    for k, node in enumerate(g.node):
        if node.op_type != "LSTM" or not all(node.input[i] in params.weights and node.input[i] in inits
                                             for i in (1, 2)):
            continue
        (w, w_scale, w_zero), (r, r_scale, r_zero) = (_integer_lstm_weight(g, scope, node.input[i],
                                                                           params.weights[node.input[i]])
                                                      for i in (1, 2))
        optional = (list(node.input[3:8]) + [""] * 5)[:5]  # B, sequence_lens, initial_h, initial_c, P
        fused = helper.make_node(INTEGER_LSTM, [node.input[0], w, r, *optional, w_scale, w_zero, r_scale, r_zero],
                                 list(node.output), name=node.name, domain="com.microsoft")
        fused.attribute.extend(a for a in node.attribute if a.name != "layout")
        replaced += [node.input[1], node.input[2]]
        g.node[k].CopyFrom(fused)
    _drop_unread(g, replaced)
    return replaced


def _integer_lstm_weight(g: onnx.GraphProto, scope, name: str, qw: QuantizedWeight) -> tuple[str, str, str]:
    """Adds DynamicQuantizeLSTM's form of an LSTM weight [D, 4H, K] quantized along axis 1 to ``g``:
    int8 [D, K, 4H] (transposed), float32 steps [D, 4H] (the gate rows' steps for each direction) and
    int8 zero points of 0 [D, 4H]; returns their names."""
    names = tuple(scope.unique_name(f"{name}_{s}") for s in ("quantized", "scale", "zero_point"))
    rows = qw.ints.shape[:2]
    g.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(qw.ints.transpose(0, 2, 1)).astype(np.int8), names[0]),
        numpy_helper.from_array(np.ascontiguousarray(np.broadcast_to(qw.scale.astype(np.float32), rows)), names[1]),
        numpy_helper.from_array(np.zeros(rows, np.int8), names[2])])
    return names


def _drop_unread(g: onnx.GraphProto, names: list[str]) -> None:
    """Removes those of ``g``'s initializers ``names`` that no node of ``g`` (or of its subgraphs) reads."""
    read = {i for n in g.node for i in reads(n)}
    inits = g.initializer
    for i in reversed([i for i, t in enumerate(inits) if t.name in names and t.name not in read]):
        del inits[i]


@STAGES.register("weights")
def quantize_weights(model, params, target):
    """Each quantized weight becomes int8 integers + per-channel DequantizeLinear (symmetric, zp 0), or,
    when it has a block size, INT4 integers + blocked DequantizeLinear (the versions stage then raises
    the opset to 21), in the graph (top level or subgraph) whose initializer it is. Asymmetric weights
    are uint8 / UINT4 with their zero points. On targets with ``matmul_nbits``, a blocked 4-bit weight
    that only a MatMul with a float A reads becomes, with that MatMul, one com.microsoft MatMulNBits
    under the MatMul's name (emit/nbits.py), written from the integers directly."""
    scope = NameScope.of(model)
    quantized = set(params.acts) | set(params.weights)
    nbits = 0
    for g in all_graphs(model.graph):
        inits = {t.name for t in g.initializer}
        own = [(name, qw) for name, qw in params.weights.items() if name in inits]
        fused = _nbits_readers(g, own, quantized) if target.matmul_nbits else {}  # before any node changes
        wiring = Wiring(g)
        for name, qw in own:
            if name in fused:
                _write_nbits(g, scope, fused[name], qw)
                _drop_initializer(g, name)
                nbits += 1
                continue
            if qw.block_size:
                out = _blocked_dq_node(g, scope, name, qw)
            else:
                dtype = np.uint8 if qw.asymmetric else np.int8
                out = _dq_node(g, scope, name, qw.ints.astype(dtype), qw.scale.astype(np.float32),
                               qw.zero_point.astype(dtype), qw.axis)
            _replace_initializer_uses(g, wiring, name, out)
    if nbits:
        _import_domain(model, "com.microsoft")
    return _sorted(model)


def _nbits_readers(g: onnx.GraphProto, own: list[tuple[str, QuantizedWeight]],
                   quantized: set[str]) -> dict[str, onnx.NodeProto]:
    """Weight name → the MatMul of ``g`` that becomes a MatMulNBits with it (emit/nbits.nbits_reader), for
    the weights ``own`` of ``g``; ``quantized``: the tensors that get a DequantizeLinear (act points and
    weights), to which the outputs of ``g``'s DequantizeLinear nodes are added."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in set(reads(node)):  # a node's subgraphs' reads of outer tensors count as its own
            readers.setdefault(name, []).append(node)
    quantized = quantized | {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    outputs = {o.name for o in g.output}
    found = {name: nbits_reader(name, qw, readers.get(name, []), quantized) for name, qw in own
             if name not in outputs}
    return {name: matmul for name, matmul in found.items() if matmul is not None}


def _write_nbits(g: onnx.GraphProto, scope, matmul: onnx.NodeProto, qw: QuantizedWeight) -> None:
    """Mutates ``g``: ``matmul`` (one of its nodes) becomes the MatMulNBits of its B quantized as ``qw``,
    in place (the node order stays), and that node's initializers are added."""
    base = matmul.name or matmul.output[0]
    parts = ("B", "scales", "zero_points") if qw.asymmetric else ("B", "scales")
    names = [scope.unique_name(f"{base}_nbits_{s}") for s in parts]
    node, tensors = matmul_nbits(matmul, qw, names)
    g.initializer.extend(tensors)
    matmul.CopyFrom(node)


def _drop_initializer(g: onnx.GraphProto, name: str) -> None:
    """Removes ``g``'s initializer ``name``, in place: rebuilding the list would copy every weight of the model."""
    inits = g.initializer
    for i in reversed([i for i, t in enumerate(inits) if t.name == name]):
        del inits[i]


@STAGES.register("biases")
def quantize_biases(model, params, target):
    """Biases of layers with quantized inputs become int32 + DequantizeLinear (scale s_x·s_w, axis 0)."""
    if not target.int32_bias:
        return model
    scope = NameScope.of(model)
    for g in all_graphs(model.graph):
        own = {t.name for t in g.initializer}
        wiring = Wiring(g)
        for name, qb in params.biases.items():
            if name in own:
                out = _dq_node(g, scope, name, qb.ints.astype(np.int32), qb.scale.astype(np.float32),
                               np.zeros(qb.ints.shape, np.int32), 0)
                _replace_initializer_uses(g, wiring, name, out)
    return _sorted(model)


@STAGES.register("activations")
def quantize_activations(model, params, target):
    """A QuantizeLinear → DequantizeLinear pair on each act point, in the graph that defines the tensor
    (top level or subgraph: a node output or a graph input); every consumer there, and every read from
    the graphs nested in it, takes the DQ output. A graph output keeps its name: its producer writes a
    renamed float tensor instead."""
    scope = NameScope.of(model)
    homes: dict[str, onnx.GraphProto] = {}  # tensor → the first graph (outermost first) that defines it
    for g in all_graphs(model.graph):
        for name in [i.name for i in g.input] + [o for n in g.node for o in n.output]:
            homes.setdefault(name, g)
    wirings: dict[int, Wiring] = {}
    for tensor, act in params.acts.items():
        g = homes.get(tensor)
        if g is not None:
            if id(g) not in wirings:
                wirings[id(g)] = Wiring(g)
            _qdq_pair(g, wirings[id(g)], scope, tensor, act)
    return _sorted(model)


def _qdq_pair(g: onnx.GraphProto, wiring: Wiring, scope, tensor: str, act) -> None:
    graph_outputs = {o.name for o in g.output}
    source = tensor
    if tensor in graph_outputs:
        source = scope.unique_name(f"{tensor}_float")
        for node in g.node:
            node.output[:] = [source if o == tensor else o for o in node.output]
        wiring.rename_reads(tensor, source)
    s_name, z_name = scope.unique_name(f"{tensor}_scale"), scope.unique_name(f"{tensor}_zero_point")
    g.initializer.extend([numpy_helper.from_array(np.array(act.scale, np.float32), s_name),
                          numpy_helper.from_array(np.array(act.zero_point, NP_OF[act.dtype]), z_name)])
    q_out = scope.unique_name(f"{tensor}_quantized")
    dq_out = tensor if tensor in graph_outputs else scope.unique_name(f"{tensor}_dequantized")
    wiring.rename_reads(source, dq_out)
    g.node.extend([
        helper.make_node("QuantizeLinear", [source, s_name, z_name], [q_out],
                         name=scope.unique_name(f"{tensor}_QuantizeLinear")),
        helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                         name=scope.unique_name(f"{tensor}_DequantizeLinear"))])


@STAGES.register("concat")
def quantize_concats(model, params, target):
    """Where ``target.quantize_concat_inputs``: in every graph, the float inputs of a Concat whose output
    is quantized are quantized with its step, for the Concat alone (emit/concat.py: the same integers)."""
    if not target.quantize_concat_inputs:
        return model
    scope = NameScope.of(model)
    for g in all_graphs(model.graph):
        quantize_concat_inputs(g, scope)
    return _sorted(model)


@STAGES.register("silu")
def fuse_silu(model, params, target):
    """Where ``target.fuse_silu``: in every graph, a SiLU that reads a DequantizeLinear becomes one
    QuickGelu (emit/silu.py says why)."""
    if target.fuse_silu and sum(fuse_silus(g) for g in all_graphs(model.graph)):
        _import_domain(model, SILU_DOMAIN)
    return model


@STAGES.register("softmax")
def move_softmaxes(model, params, target):
    """Where ``target.softmax_before_transpose`` and the model's opset has one-axis Softmax: in every
    graph, a Softmax that would normalise a transposed tensor along a slow axis runs before the
    Transpose instead (emit/softmax.py: the same values)."""
    if target.softmax_before_transpose and default_opset(model) >= SOFTMAX_OPSET:
        for g in all_graphs(model.graph):
            softmax_before_transpose(g)
    return model


@STAGES.register("versions")
def set_versions(model, params, target):
    """Opset within the target's range (a newer model is converted down to the newest opset the
    runtime reads; a model with blocked weights is converted up to opset 21); the lowest IR version
    those opsets need, which every onnxruntime that knows the opsets loads (onnx writes its newest IR
    by default)."""
    if default_opset(model) < target.min_opset:
        set_default_opset(model, target.min_opset)
    blocked = any(n.op_type == "DequantizeLinear" and node_attr(n, "block_size", 0) for n in model.graph.node)
    if blocked and default_opset(model) < BLOCKED_OPSET:
        if target.max_opset and target.max_opset < BLOCKED_OPSET:
            raise UnsupportedModelError(
                f"{target.name} reads at most opset {target.max_opset}, and blocked 4-bit weights "
                f"(group_size) need opset {BLOCKED_OPSET} — use group_size=0 for this target")
        model = _convert_opset(model, target, BLOCKED_OPSET)
    if target.max_opset and default_opset(model) > target.max_opset:
        model = _convert_opset(model, target, target.max_opset)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return model


def _convert_opset(model: onnx.ModelProto, target: Target, version: int) -> onnx.ModelProto:
    from onnx import version_converter

    opset = default_opset(model)
    try:
        light, held = without_payloads(model)
        return with_payloads(version_converter.convert_version(light, version), held)
    except Exception as exc:  # the converter raises several unrelated types
        if version > opset:
            raise UnsupportedModelError(
                f"the model uses opset {opset} and its blocked 4-bit weights need opset {version}; onnx's "
                f"version converter could not convert it ({exc}) — export the model with opset {version} "
                "or higher, or use group_size=0") from exc
        raise UnsupportedModelError(
            f"the model uses opset {opset} and {target.name} reads at most opset {target.max_opset}; "
            f"onnx's version converter could not convert it ({exc}) — export the model with "
            f"opset {target.max_opset} or lower") from exc


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes of every graph in topological order (new Q/DQ nodes were appended at the end); a node
    with subgraphs depends on the tensors they read from outside, too."""
    for g in reversed(all_graphs(model.graph)):  # inner first: re-adding a parent's nodes copies them
        _sort_graph(g)
    return model


def _sort_graph(g: onnx.GraphProto) -> None:
    produced_by = {o: n for n in g.node for o in n.output if o}
    done: set[int] = set()
    order: list[onnx.NodeProto] = []
    for node in g.node:
        stack = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if id(current) in done:
                continue
            if expanded:
                done.add(id(current))
                order.append(current)
                continue
            stack.append((current, True))
            stack.extend((produced_by[i], False) for i in reads(current) if i in produced_by
                         and id(produced_by[i]) not in done)
    del g.node[:]
    g.node.extend(order)
