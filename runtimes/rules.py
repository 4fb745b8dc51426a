"""Static QDQ rules: what keeps a layer of a QDQ model from running as integers on a target.

Every rule is a pure function ``(GraphView, Target) -> list[Finding]`` registered by name, and reads
the target's data (dtypes, symmetry, placement, opsets) rather than its name, so one set of rules
serves every runtime. A finding is a *fallback* when the layer (or the Add/Concat) would not run in
integer precision, and a warning when it still would but the placement costs speed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxflex.graph import default_opset, node_attr
from onnxflex.placement import (BLOCKED_OPSET, PER_CHANNEL_OPSET, output_point, reduction_depth, residual_skips,
                                weight_axes)
from onnxflex.registry import Registry
from onnxflex.runtimes.base import WEIGHTED_OPS, Target

DTYPE_NAMES = {v: k for k, v in TensorProto.DataType.items()}


@dataclass(frozen=True)
class Finding:
    """One problem at one node: ``rule`` names the rule, ``fallback`` says whether it costs integer
    execution (True) or only speed (False)."""

    node: str
    op_type: str
    rule: str
    message: str
    fallback: bool = True


class GraphView:
    """Read-only lookups over a model: producers, consumers, initializers, Q/DQ structure."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.opset = default_opset(model)

    def array(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def from_op(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def weight_dq(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """The DequantizeLinear of a constant that feeds ``node``'s weight input, if any."""
        dq = self.from_op(node.input[1], "DequantizeLinear") if len(node.input) > 1 else None
        return dq if dq is not None and dq.input[0] in self.inits else None

    @cached_property
    def layers(self) -> list[onnx.NodeProto]:
        """Weighted nodes: Conv/ConvTranspose/Gemm/MatMul whose weight is a constant or a DQ of one."""
        return [n for n in self.nodes if n.op_type in WEIGHTED_OPS and len(n.input) > 1
                and (n.input[1] in self.inits or self.weight_dq(n) is not None)]

    @cached_property
    def residual_skips(self) -> dict[str, onnx.NodeProto]:
        """Skip tensor → its Add for the Adds a weighted layer feeds (onnxflex.placement.residual_skips),
        named as the tensor reaches the Add (a DQ output, or the raw tensor when Q/DQ are missing)."""
        return residual_skips(self.nodes, {n.output[0] for n in self.layers}, self.inits)

    def zero_point(self, qdq: onnx.NodeProto) -> tuple[np.ndarray | None, int]:
        """(zero point values or None, integer dtype) of a Q or DQ node; no zero point means uint8."""
        if len(qdq.input) > 2 and qdq.input[2]:
            t = self.inits.get(qdq.input[2])
            return (numpy_helper.to_array(t), t.data_type) if t is not None else (None, TensorProto.UNDEFINED)
        if qdq.op_type == "DequantizeLinear" and qdq.input[0] in self.inits:
            return None, self.inits[qdq.input[0]].data_type
        return None, node_attr(qdq, "output_dtype", TensorProto.UINT8) or TensorProto.UINT8


Rule = Callable[[GraphView, Target], list[Finding]]
RULES: Registry[Rule] = Registry("check rule")


def static_findings(model: onnx.ModelProto, target: Target) -> list[Finding]:
    """Every registered rule's findings on ``model`` for ``target``, in rule then graph order."""
    view = GraphView(model)
    return [f for name in RULES for f in RULES.get(name)(view, target)]


def _name(dtype: int) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))


@RULES.register("opset")
def check_opset(view: GraphView, target: Target) -> list[Finding]:
    out = []
    if view.opset < target.min_opset or view.opset > (target.max_opset or view.opset):
        upper = target.max_opset or "newest"
        out.append(Finding("(model)", "", "opset", f"default-domain opset {view.opset} is outside "
                           f"[{target.min_opset}, {upper}] that {target.name} reads; per-channel DequantizeLinear "
                           f"needs {PER_CHANNEL_OPSET} — re-emit with onnxflex or convert the opset"))
    blocked = [n for n in view.nodes if n.op_type == "DequantizeLinear" and node_attr(n, "block_size", 0)]
    if blocked and view.opset < BLOCKED_OPSET:
        out += [Finding(n.name, n.op_type, "opset", f"block_size needs opset {BLOCKED_OPSET}, the model "
                        f"imports {view.opset}") for n in blocked]
    return out


@RULES.register("weight-qdq")
def check_weights(view: GraphView, target: Target) -> list[Finding]:
    """The weight reads an integer constant through DequantizeLinear, per channel on the output axis
    (or blocked on the input axis for 4-bit weight-only ops), with zero point 0 (a weight-only layer
    of a target with ``weight_only_zero_points`` may be asymmetric: uint8 / UINT4 with zero points)."""
    out = []
    for node in view.layers:
        dq = view.weight_dq(node)
        if dq is None:
            out.append(Finding(node.name, node.op_type, "weight-qdq", f"weight {node.input[1]!r} is a float "
                               "initializer with no DequantizeLinear; the layer runs in float"))
            continue
        out += _weight_encoding(view, node, dq, target)
    return out


def _weight_encoding(view: GraphView, node, dq, target: Target) -> list[Finding]:
    ints = view.inits[dq.input[0]]
    scale = view.array(dq.input[1])
    block = node_attr(dq, "block_size", 0)
    where = f"weight {node.input[1]!r}"
    # an asymmetric weight (unsigned, with zero points) is fine on a weight-only layer of a target that takes them
    zero_points_ok = target.weight_only_zero_points and view.from_op(node.input[0], "DequantizeLinear") is None
    if block:
        if ints.data_type not in target.blocked_weight_dtypes or node.op_type not in target.blocked_weight_ops:
            return [Finding(node.name, node.op_type, "weight-dtype", f"{where}: blocked {_name(ints.data_type)} "
                            f"on {node.op_type} is not run by {target.name} (it runs blocked "
                            f"{'/'.join(map(_name, target.blocked_weight_dtypes))} on "
                            f"{'/'.join(target.blocked_weight_ops)})")]
    elif ints.data_type != target.weight_dtype and not (zero_points_ok and ints.data_type == TensorProto.UINT8):
        return [Finding(node.name, node.op_type, "weight-dtype", f"{where} is {_name(ints.data_type)}; "
                        f"{target.name} runs {_name(target.weight_dtype)} weights")]
    out = []
    if scale is not None and scale.size > 1:
        axis = node_attr(dq, "axis", 1) % len(ints.dims)
        want = weight_axes(node)[1 if block else 0]
        if axis != want or (not block and scale.size != ints.dims[axis]):
            kind = "blocked" if block else "per-channel"
            out.append(Finding(node.name, node.op_type, "weight-axis", f"{where}: {kind} DequantizeLinear on "
                               f"axis {axis} (scale {list(scale.shape)}); {node.op_type} needs axis {want}"))
        elif not block and view.opset < PER_CHANNEL_OPSET:
            out.append(Finding(node.name, node.op_type, "opset", f"{where}: per-channel DequantizeLinear needs "
                               f"opset {PER_CHANNEL_OPSET}, the model imports {view.opset}"))
    zp, _ = view.zero_point(dq)
    if zp is not None and np.any(zp != 0) and not zero_points_ok:
        out.append(Finding(node.name, node.op_type, "zero-point", f"{where} has a non-zero zero point; "
                           f"{target.name} runs symmetric weights only"))
    return out


@RULES.register("input-qdq")
def check_inputs(view: GraphView, target: Target) -> list[Finding]:
    """The activation input comes through Q → DQ, per tensor, in a dtype (and symmetry) the target
    runs; weight-only blocked layers may read a float activation."""
    out = []
    for node in view.layers:
        dq_w = view.weight_dq(node)
        if dq_w is not None and node_attr(dq_w, "block_size", 0):
            continue
        out += act_findings(view, node, node.input[0], target, "input-qdq")
    return out


def act_findings(view: GraphView, node, tensor: str, target: Target, rule: str) -> list[Finding]:
    """What is wrong with activation ``tensor`` as ``node`` reads it (empty when it is a good Q/DQ)."""
    dq = view.from_op(tensor, "DequantizeLinear")
    if dq is None or view.from_op(dq.input[0], "QuantizeLinear") is None:
        return [Finding(node.name, node.op_type, rule, f"input {tensor!r} does not come through "
                        "QuantizeLinear → DequantizeLinear; the op reads float")]
    zp, dtype = view.zero_point(dq)
    scale = view.array(dq.input[1])
    out = []
    if dtype not in target.act_dtypes:
        out.append(Finding(node.name, node.op_type, "act-dtype", f"input {tensor!r} is quantized to "
                           f"{_name(dtype)}; {target.name} runs {'/'.join(map(_name, target.act_dtypes))} "
                           "activations"))
    if target.symmetric_only and zp is not None and np.any(zp != 0):
        out.append(Finding(node.name, node.op_type, "zero-point", f"input {tensor!r} has zero point "
                           f"{zp.ravel()[:4].tolist()}; {target.name} runs symmetric activations only"))
    if scale is None or scale.size != 1:
        out.append(Finding(node.name, node.op_type, "act-axis", f"input {tensor!r} is not quantized per "
                           f"tensor (scale {'not constant' if scale is None else list(scale.shape)})"))
    return out


@RULES.register("bias")
def check_bias(view: GraphView, target: Target) -> list[Finding]:
    """int32 bias through DequantizeLinear where the target wants it, a float bias where it does not."""
    out = []
    for node in view.layers:
        if len(node.input) < 3 or not node.input[2]:
            continue
        dq = view.from_op(node.input[2], "DequantizeLinear")
        if target.int32_bias and view.from_op(node.input[0], "DequantizeLinear") is not None:
            ints = view.inits.get(dq.input[0]) if dq is not None else None
            if ints is None or ints.data_type != TensorProto.INT32:
                out.append(Finding(node.name, node.op_type, "bias", f"bias {node.input[2]!r} is not an int32 "
                                   f"constant through DequantizeLinear, which {target.name} needs to fuse "
                                   "the layer"))
        elif not target.int32_bias and dq is not None:
            out.append(Finding(node.name, node.op_type, "bias", f"bias {node.input[2]!r} goes through "
                               f"DequantizeLinear; {target.name} takes a float bias and quantizes it itself"))
    return out


@RULES.register("output-q")
def check_outputs(view: GraphView, target: Target) -> list[Finding]:
    """Output Q where the target fuses DQ → op → Q (warning when missing), none where it does not."""
    out = []
    skips = set(view.residual_skips) if target.quantize_residual_add else set()
    for node in view.layers:
        users = view.consumers.get(node.output[0], [])
        if not target.quantize_outputs:
            quantized = [u for u in users if u.op_type == "QuantizeLinear"]
            if quantized and not any(_dq_outputs(view, q) & skips for q in quantized):
                out.append(Finding(node.name, node.op_type, "output-q", f"output {node.output[0]!r} is quantized;"
                                   f" {target.name} wants no Q on weighted-op outputs (it splits the op from "
                                   "what follows)", fallback=False))
            continue
        users = view.consumers.get(output_point(node.output[0], view.consumers, target.absorb), [])
        if users and not any(u.op_type == "QuantizeLinear" for u in users):
            out.append(Finding(node.name, node.op_type, "output-q", f"output {node.output[0]!r} has no "
                               f"QuantizeLinear; {target.name} may keep the op in float", fallback=False))
    return out


def _dq_outputs(view: GraphView, q: onnx.NodeProto) -> set[str]:
    return {dq.output[0] for dq in view.consumers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"}


@RULES.register("residual-add")
def check_residual_adds(view: GraphView, target: Target) -> list[Finding]:
    """The skip input of an Add fed by a weighted op comes through Q/DQ (the Add fuses into the op)."""
    if not target.quantize_residual_add:
        return []
    out = []
    for skip, add in view.residual_skips.items():
        out += act_findings(view, add, skip, target, "residual-add")
    return out


@RULES.register("concat-scales")
def check_concat_scales(view: GraphView, target: Target) -> list[Finding]:
    """The dequantized inputs of a Concat share one step and zero point."""
    if not target.shared_concat_scales:
        return []
    out = []
    for node in (n for n in view.nodes if n.op_type == "Concat"):
        qparams = set()
        for tensor in node.input:
            dq = view.from_op(tensor, "DequantizeLinear")
            if dq is not None and dq.input[0] not in view.inits:
                scale, (zp, _) = view.array(dq.input[1]), view.zero_point(dq)
                qparams.add((None if scale is None else tuple(scale.ravel().tolist()),
                             None if zp is None else tuple(zp.ravel().tolist())))
        if len(qparams) > 1:
            out.append(Finding(node.name, node.op_type, "concat-scales", f"its quantized inputs use "
                               f"{len(qparams)} different steps; {target.name} needs one step for all of "
                               "them to concatenate integers"))
    return out


LATENCY_FLOAT = "latency-float"


@RULES.register(LATENCY_FLOAT)
def check_latency_floats(view: GraphView, target: Target) -> list[Finding]:
    """A float layer (float weight initializer) that the latency rule keeps float on ``target``: depth
    below ``target.float_depth`` and its output not read only by integer layers through Q/DQ (the rule
    of passes/select.latency_floats, on the emitted graph). A warning with the reason; onnxflex.check
    drops that layer's fallback findings, which all follow from its being float by design."""
    if not target.float_depth:
        return []
    out = []
    for node in view.layers:
        if node.input[1] not in view.inits:
            continue
        depth = reduction_depth(node, view.inits[node.input[1]].dims)
        if depth < target.float_depth and not _integer_readers(view, node, target.absorb):
            out.append(Finding(node.name, node.op_type, LATENCY_FLOAT, f"float by design: it sums {depth} "
                               f"products per output, below {target.name}'s float_depth {target.float_depth}, "
                               "so it runs faster in float than as an integer kernel with its Q/DQ "
                               "(quantize with --no-latency-rules to make it integer)", fallback=False))
    return out


def _integer_readers(view: GraphView, node: onnx.NodeProto, absorb: tuple[str, ...]) -> bool:
    """True when every reader of ``node``'s output point is a QuantizeLinear whose DequantizeLinears are
    read only by integer layers (weight through DQ), as their activation input."""
    outputs = {o.name for o in view.model.graph.output}
    point = output_point(node.output[0], view.consumers, absorb, outputs)
    users = view.consumers.get(point, [])
    if point in outputs or not users or any(u.op_type != "QuantizeLinear" for u in users):
        return False
    dqs = [d for q in users for d in view.consumers.get(q.output[0], [])]
    readers = [r for d in dqs for r in view.consumers.get(d.output[0], [])]
    return bool(readers) and all(d.op_type == "DequantizeLinear" for d in dqs) and all(
        r in view.layers and view.weight_dq(r) is not None and r.input[0] in {d.output[0] for d in dqs}
        for r in readers)


RECURRENT_KINDS = ("LSTM", "GRU", "RNN")
INTEGER_LSTM = "DynamicQuantizeLSTM"


def recurrent_nodes(view: GraphView, target: Target) -> list[onnx.NodeProto]:
    """Recurrent nodes ``target`` can run with integer weights (they count as layers): float LSTMs and
    com.microsoft DynamicQuantizeLSTMs where the target runs LSTM that way."""
    if "LSTM" not in target.recurrent_ops:
        return []
    return [n for n in view.nodes if n.op_type == "LSTM" or (n.op_type == INTEGER_LSTM and n.domain == "com.microsoft")]


@RULES.register("recurrent")
def check_recurrent(view: GraphView, target: Target) -> list[Finding]:
    """A float LSTM falls back where the target has an integer LSTM kernel; a DynamicQuantizeLSTM needs
    int8 W and R initializers with zero points 0 and a target that runs it; GRU/RNN (and LSTM where the
    target has no such kernel) run in float by design: a warning."""
    out = []
    for node in view.nodes:
        if node.op_type in RECURRENT_KINDS and node.op_type not in target.recurrent_ops:
            out.append(Finding(node.name, node.op_type, "recurrent", f"{target.name} has no integer "
                               f"{node.op_type} kernel; it runs in float (its state too)", fallback=False))
        elif node.op_type == "LSTM":
            out.append(Finding(node.name, node.op_type, "recurrent", f"a float LSTM; {target.name} runs LSTMs "
                               f"with int8 weights as com.microsoft {INTEGER_LSTM} (what onnxflex quantize writes)"))
        elif node.op_type == INTEGER_LSTM and "LSTM" not in target.recurrent_ops:
            out.append(Finding(node.name, node.op_type, "recurrent", f"{target.name} does not run {INTEGER_LSTM}"))
        elif node.op_type == INTEGER_LSTM:
            out += _integer_lstm(view, node)
    return out


def _integer_lstm(view: GraphView, node: onnx.NodeProto) -> list[Finding]:
    out = []
    for k, z, what in ((1, 9, "W"), (2, 11, "R")):  # W_zero_point, R_zero_point
        t = view.inits.get(node.input[k])
        zp = view.array(node.input[z]) if len(node.input) > z else None
        if t is None or t.data_type != TensorProto.INT8:
            out.append(Finding(node.name, node.op_type, "recurrent", f"{what} {node.input[k]!r} is not an int8 "
                               "initializer"))
        elif zp is not None and np.any(zp):
            out.append(Finding(node.name, node.op_type, "recurrent", f"{what}'s zero point is not 0 (int8 weights "
                               "must be symmetric)"))
    return out
