"""fold_layernorms: fold per-channel LayerNorm output ranges into γ/β and the next MatMul/Gemm (RepQuant).

LayerNorm outputs of transformers have a few channels whose range is many times the others', so a
single per-tensor step either clips them or leaves the other channels with a handful of levels. Per
channel c, with the channel's calibration range [lo_c, hi_c], a shift m_c = (lo_c + hi_c) / 2 and a
ratio r_c = (hi_c - lo_c) / R (R the geometric mean of the ranges) give every channel of

    y' = (y - m) / r

the same range [-R/2, R/2]. The LayerNorm computes y' directly (γ' = γ / r, β' = (β - m) / r) and
every reader undoes it in its weights: y W + b = y' (diag(r) W) + (m W + b). The rewrite is exact in
real arithmetic, so a per-tensor quantizer on y' quantizes y per channel (step r_c·s, offset m_c) while
the emitted model keeps per-tensor activations. The shift needs a bias on every reader; without one
only the ratios are folded.

A LayerNorm is folded when its affine parameters are 1-D constants over the last axis (the
LayerNormalization op, or the Mul(γ)/Add(β) tail of a decomposed one after a Div) and every reader of its
output is a MatMul with a constant [C, N] weight or a Gemm (transA 0) with a constant B (Shape and Size
readers, which see only the shape, are allowed too).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxflex.blocks import BlockPlan
from onnxflex.calib import CalibrationSet
from onnxflex.extdata import tensor_array
from onnxflex.graph import NameScope, consumers, node_attr
from onnxflex.probes import channel_ranges

SHAPE_ONLY = ("Shape", "Size")  # readers of the output's shape, not its values: the fold leaves them alone
RANGE_FLOOR = 1e-3  # a channel's range is at least this fraction of the largest, so r stays bounded


@dataclass(frozen=True)
class Reader:
    """A weighted node reading the LayerNorm output: its weight initializer, the weight axis along the
    LayerNorm channels (0 for MatMul [C, N], 1 for Gemm with transB, else 0), and its bias initializer."""

    node: str
    weight: str
    channel_axis: int
    bias: str | None
    bias_gain: float  # Gemm: alpha / beta (the bias is scaled by beta, the product by alpha); MatMul: 1


@dataclass(frozen=True)
class LayerNormFold:
    """One foldable LayerNorm: its output tensor, γ and β initializers (β None: the op has none yet), the
    node whose inputs hold them, and its readers."""

    output: str
    norm: str
    gamma: str
    beta: str | None
    readers: tuple[Reader, ...]

    @property
    def shifts(self) -> bool:
        return all(r.bias is not None for r in self.readers)


def find_layernorm_folds(model: onnx.ModelProto, points: tuple[str, ...]) -> list[LayerNormFold]:
    """The LayerNorms whose output is an activation quant point in ``points`` and can be folded."""
    inits = {t.name: t for t in model.graph.initializer}
    users = consumers(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    folds = []
    for tensor in points:
        node = producer.get(tensor)
        affine = _affine_of(node, producer, inits) if node is not None else None
        if affine is None or tensor in graph_outputs:
            continue
        gamma, beta, owner, holders = affine
        readers = [_reader(n, tensor, inits, users) for n in users.get(tensor, [])
                   if n.op_type not in SHAPE_ONLY]
        shared = {gamma, beta} & {i for n in model.graph.node if n.name not in holders for i in n.input}
        if readers and None not in readers and not shared:
            folds.append(LayerNormFold(tensor, owner, gamma, beta, tuple(readers)))
    return folds


def _affine_of(node, producer, inits):
    """(γ name, β name or None, name of the node ending the LayerNorm, names of the nodes reading γ and β)
    when ``node`` ends a LayerNorm over the last axis with 1-D constant parameters; else None."""
    def vector(name):
        return name in inits and len(inits[name].dims) == 1

    if node.op_type == "LayerNormalization":
        if node_attr(node, "axis", -1) != -1 or len(node.output) > 1 and any(node.output[1:]):
            return None
        beta = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if vector(node.input[1]) and (beta is None or vector(beta)):
            return node.input[1], beta, node.name, {node.name}
        return None
    if node.op_type != "Add":  # decomposed: Div → Mul(γ) → Add(β)
        return None
    beta = next((i for i in node.input if vector(i)), None)
    mul = next((producer.get(i) for i in node.input if i != beta), None)
    if beta is None or mul is None or mul.op_type != "Mul":
        return None
    gamma = next((i for i in mul.input if vector(i)), None)
    div = next((producer.get(i) for i in mul.input if i != gamma), None)
    if gamma is None or div is None or div.op_type != "Div":
        return None
    return gamma, beta, node.name, {node.name, mul.name}


def _reader(node, tensor, inits, users) -> Reader | None:
    if node.op_type == "MatMul" and node.input[0] == tensor and node.input[1] in inits \
            and len(inits[node.input[1]].dims) == 2:
        follow = users.get(node.output[0], [])
        bias = None
        if len(follow) == 1 and follow[0].op_type == "Add":
            bias = next((i for i in follow[0].input if i in inits and list(inits[i].dims) ==
                         [inits[node.input[1]].dims[1]]), None)
        return Reader(node.name, node.input[1], 0, bias, 1.0)
    if node.op_type == "Gemm" and node.input[0] == tensor and not node_attr(node, "transA", 0) \
            and node.input[1] in inits:
        beta = node_attr(node, "beta", 1.0)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits and beta else None
        if bias is not None and len(inits[bias].dims) != 1:
            bias = None
        gain = node_attr(node, "alpha", 1.0) / beta if bias is not None else 1.0
        return Reader(node.name, node.input[1], 1 if node_attr(node, "transB", 0) else 0, bias, gain)
    return None


def fold_factors(lo: np.ndarray, hi: np.ndarray, shift: bool) -> tuple[np.ndarray, np.ndarray]:
    """(r, m) float64 [C] from per-channel ranges: after the fold every channel spans the same range,
    centred on 0 when ``shift``. r has geometric mean 1, so weights keep their overall magnitude."""
    span = np.maximum(hi.astype(np.float64) - lo, 0.0)
    span = np.maximum(span, RANGE_FLOOR * max(float(span.max()), 1e-12))
    r = span / np.exp(np.log(span).mean())
    m = (hi.astype(np.float64) + lo) / 2 if shift else np.zeros_like(span)
    return r, m


def apply_fold(model: onnx.ModelProto, fold: LayerNormFold, r: np.ndarray, m: np.ndarray) -> None:
    """Mutates ``model``: γ/β of the LayerNorm and the readers' weights and biases, as the module says.
    Adds a β initializer to a LayerNormalization that has none when m is non-zero."""
    inits = {t.name: t for t in model.graph.initializer}

    def update(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(_dtype(inits[name])), name))

    gamma = tensor_array(inits[fold.gamma], model).astype(np.float64)
    beta = np.zeros_like(gamma) if fold.beta is None else tensor_array(inits[fold.beta], model).astype(np.float64)
    update(fold.gamma, gamma / r)
    if fold.beta is not None:
        update(fold.beta, (beta - m) / r)
    elif m.any():
        node = next(n for n in model.graph.node if n.name == fold.norm)
        name = NameScope.of(model).unique_name(f"{fold.norm}.beta")
        model.graph.initializer.append(numpy_helper.from_array((-m / r).astype(_dtype(inits[fold.gamma])), name))
        node.input.append(name)
    for reader in fold.readers:
        w = tensor_array(inits[reader.weight], model).astype(np.float64)
        rows = w if reader.channel_axis == 0 else w.T  # [C, N]
        if reader.bias is not None:
            update(reader.bias, tensor_array(inits[reader.bias], model).astype(np.float64) + reader.bias_gain * (m @ rows))
        scaled = rows * r[:, None]
        update(reader.weight, scaled if reader.channel_axis == 0 else scaled.T)


def _dtype(tensor: onnx.TensorProto) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)


def fold_layernorms(plan: BlockPlan, data: CalibrationSet, providers) -> tuple[BlockPlan, list[dict]]:
    """Folds every foldable LayerNorm among ``plan.act_points`` (see the module docstring), with the
    ranges ``plan.model`` gives on ``data``. Returns (the plan with a folded copy of the model, or
    ``plan`` itself when nothing folds; ``plan`` is not changed) and one report row per fold: output
    tensor, readers, whether the shift was folded, and the largest/smallest channel range ratio before
    the fold."""
    folds = find_layernorm_folds(plan.model, plan.act_points)
    if not folds:
        return plan, []
    ranges = channel_ranges(plan.model, [f.output for f in folds], data, providers)
    model = onnx.ModelProto()
    model.CopyFrom(plan.model)
    rows = []
    for fold in folds:
        lo, hi = ranges[fold.output]
        r, m = fold_factors(lo, hi, fold.shifts)
        apply_fold(model, fold, r, m)
        rows.append({"tensor": fold.output, "readers": [x.node for x in fold.readers], "shift": fold.shifts,
                     "range_ratio": round(float(r.max() / r.min()), 3)})
    return dataclasses.replace(plan, model=model), rows
