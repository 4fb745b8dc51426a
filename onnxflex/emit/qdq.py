"""Emit a QDQ model: integer weight initializers with DequantizeLinear, int32 biases, and
QuantizeLinear/DequantizeLinear pairs on activation quant points, for the target's placement rules.

Each stage takes (model, params, target) and returns the model; stages mutate the copy ``emit`` makes.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxflex.emit.pack import int4_initializer
from onnxflex.errors import UnsupportedModelError
from onnxflex.graph import NameScope, consumers, default_opset, node_attr, set_default_opset
from onnxflex.qparams import QuantizedWeight, QuantParams
from onnxflex.registry import Registry
from onnxflex.runtimes.base import Target

Stage = Callable[[onnx.ModelProto, QuantParams, Target], onnx.ModelProto]
STAGES: Registry[Stage] = Registry("emitter stage")
ORDER = ("weights", "biases", "activations", "versions")
NP_OF = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}
BLOCKED_OPSET = 21  # DequantizeLinear's block_size and INT4 inputs


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


def _dq_node(model, scope, base: str, ints: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
             axis: int | None) -> str:
    """Adds integer/scale/zero-point initializers and a DequantizeLinear; returns its output name."""
    g = model.graph
    q_name, s_name, z_name = (scope.unique_name(f"{base}_{s}") for s in ("quantized", "scale", "zero_point"))
    g.initializer.extend([numpy_helper.from_array(ints, q_name), numpy_helper.from_array(scale, s_name),
                          numpy_helper.from_array(zero_point, z_name)])
    out = scope.unique_name(f"{base}_dequantized")
    attrs = {"axis": axis} if axis is not None else {}
    g.node.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out],
                                   name=scope.unique_name(f"{base}_DequantizeLinear"), **attrs))
    return out


def _replace_initializer_uses(model, old: str, new: str) -> None:
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old and node.op_type != "DequantizeLinear":
                node.input[i] = new
    inits = model.graph.initializer
    for i in reversed([i for i, t in enumerate(inits) if t.name == old]):
        del inits[i]  # in place: rebuilding the list would copy every weight of the model


def _blocked_dq_node(model, scope, base: str, qw: QuantizedWeight) -> str:
    """Adds a packed INT4 initializer (2-4 bit values in the 4-bit container), its float32 scale of
    blocked shape and a DequantizeLinear(axis, block_size) with no zero point (symmetric: 0);
    returns its output name. onnxruntime fuses it with a MatMul reading it into MatMulNBits."""
    g = model.graph
    q_name, s_name = scope.unique_name(f"{base}_quantized"), scope.unique_name(f"{base}_scale")
    g.initializer.extend([int4_initializer(qw.ints, q_name, signed=True),
                          numpy_helper.from_array(qw.scale.astype(np.float32), s_name)])
    out = scope.unique_name(f"{base}_dequantized")
    g.node.append(helper.make_node("DequantizeLinear", [q_name, s_name], [out],
                                   name=scope.unique_name(f"{base}_DequantizeLinear"), axis=qw.axis,
                                   block_size=qw.block_size))
    return out


@STAGES.register("weights")
def quantize_weights(model, params, target):
    """Each quantized weight becomes int8 integers + per-channel DequantizeLinear (symmetric, zp 0), or,
    when it has a block size, INT4 integers + blocked DequantizeLinear (the versions stage then raises
    the opset to 21)."""
    scope = NameScope.of(model)
    for name, qw in params.weights.items():
        if qw.block_size:
            out = _blocked_dq_node(model, scope, name, qw)
        else:
            out = _dq_node(model, scope, name, qw.ints.astype(np.int8), qw.scale.astype(np.float32),
                           qw.zero_point.astype(np.int8), qw.axis)
        _replace_initializer_uses(model, name, out)
    return _sorted(model)


@STAGES.register("biases")
def quantize_biases(model, params, target):
    """Biases of layers with quantized inputs become int32 + DequantizeLinear (scale s_x·s_w, axis 0)."""
    if not target.int32_bias:
        return model
    scope = NameScope.of(model)
    for name, qb in params.biases.items():
        out = _dq_node(model, scope, name, qb.ints.astype(np.int32), qb.scale.astype(np.float32),
                       np.zeros(qb.ints.shape, np.int32), 0)
        _replace_initializer_uses(model, name, out)
    return _sorted(model)


@STAGES.register("activations")
def quantize_activations(model, params, target):
    """A QuantizeLinear → DequantizeLinear pair on each act point; every consumer reads the DQ output.
    A graph output keeps its name: its producer writes a renamed float tensor instead."""
    g = model.graph
    scope = NameScope.of(model)
    graph_outputs = {o.name for o in g.output}
    for tensor, act in params.acts.items():
        source = tensor
        if tensor in graph_outputs:
            source = scope.unique_name(f"{tensor}_float")
            for node in g.node:
                node.output[:] = [source if o == tensor else o for o in node.output]
                node.input[:] = [source if i == tensor else i for i in node.input]
        users = consumers(model).get(source, [])
        s_name, z_name = scope.unique_name(f"{tensor}_scale"), scope.unique_name(f"{tensor}_zero_point")
        g.initializer.extend([numpy_helper.from_array(np.array(act.scale, np.float32), s_name),
                              numpy_helper.from_array(np.array(act.zero_point, NP_OF[act.dtype]), z_name)])
        q_out = scope.unique_name(f"{tensor}_quantized")
        dq_out = tensor if tensor in graph_outputs else scope.unique_name(f"{tensor}_dequantized")
        g.node.extend([
            helper.make_node("QuantizeLinear", [source, s_name, z_name], [q_out],
                             name=scope.unique_name(f"{tensor}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                             name=scope.unique_name(f"{tensor}_DequantizeLinear"))])
        for node in users:
            node.input[:] = [dq_out if i == source else i for i in node.input]
    return _sorted(model)


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
        return version_converter.convert_version(model, version)
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
    """Nodes in topological order (new Q/DQ nodes were appended at the end)."""
    g = model.graph
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
            stack.extend((produced_by[i], False) for i in current.input if i in produced_by
                         and id(produced_by[i]) not in done)
    del g.node[:]
    g.node.extend(order)
    return model
