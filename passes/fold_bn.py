"""fold_batchnorm and fold_bias_add: absorb per-channel affine ops into the weighted node before them.

Exporters leave BatchNormalization unfolded, or emit it as Mul/Add constant chains, or write biases as
separate Add nodes. Folding them gives one weighted node per layer, so its weights are quantized in their
final form and the emitter can fuse the layer into an integer kernel.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxflex.extdata import tensor_array
from onnxflex.graph import NameScope, consumers, drop_unused_initializers, node_attr
from onnxflex.passes.context import PassContext

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


def fold_batchnorm(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Mutates and returns ``model``: BatchNormalization after Conv/ConvTranspose/Gemm folds into it."""
    return _fold_following(model, {"BatchNormalization"}, _bn_affine)


def fold_bias_add(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Mutates and returns ``model``: per-channel constant Mul/Add after Conv/ConvTranspose/Gemm fold into it."""
    return _fold_following(model, {"Mul", "Add"}, _mul_add_affine)


def _fold_following(model, op_types, affine_of) -> onnx.ModelProto:
    g = model.graph
    changed = True
    while changed:
        changed = False
        inits = {t.name: t for t in g.initializer}
        users = consumers(model)
        graph_outputs = {o.name for o in g.output}
        for node in g.node:
            if node.op_type not in FOLDABLE or len(node.input) < 2 or node.input[1] not in inits:
                continue
            out = node.output[0]
            follow = users.get(out, [])
            if out in graph_outputs or len(follow) != 1 or follow[0].op_type not in op_types:
                continue
            w = tensor_array(inits[node.input[1]], model)
            channels = _out_channels(node, w)
            affine = affine_of(follow[0], out, inits, channels, _out_rank(node, w))
            bias = _current_bias(node, inits, channels)
            if affine is None or bias is None:
                continue
            _apply_affine(model, node, inits, bias, *affine)
            node.output[0] = follow[0].output[0]
            g.node.remove(follow[0])
            changed = True
            break
    drop_unused_initializers(model)
    return model


def _out_channels(node: onnx.NodeProto, w: np.ndarray) -> int:
    if node.op_type == "Conv":
        return w.shape[0]
    if node.op_type == "ConvTranspose":
        return w.shape[1] * node_attr(node, "group", 1)
    return w.shape[0] if node_attr(node, "transB", 0) else w.shape[1]


def _out_rank(node: onnx.NodeProto, w: np.ndarray) -> int:
    """Rank of the node's output [N, C, ...]: a Conv's output has its weight's rank, a Gemm's is 2."""
    return 2 if node.op_type == "Gemm" else w.ndim


def _bn_affine(bn, x_name, inits, channels, rank):
    """y = scale * x + shift for an inference BatchNormalization, or None when its params are not constant."""
    if bn.input[0] != x_name or not all(i in inits for i in bn.input[1:5]) or len([o for o in bn.output if o]) > 1:
        return None
    gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
    scale = gamma / np.sqrt(var + node_attr(bn, "epsilon", 1e-5))
    return scale, beta - mean * scale


def _mul_add_affine(node, x_name, inits, channels, rank):
    other = [i for i in node.input if i != x_name]
    if len(other) != 1 or other[0] not in inits or list(node.input).count(x_name) != 1:
        return None
    c = numpy_helper.to_array(inits[other[0]]).astype(np.float64)
    vec = _per_channel(c, channels, rank)
    if vec is None:
        return None
    if node.op_type == "Mul":
        return vec, np.zeros(channels)
    return np.ones(channels), vec


def _per_channel(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``c`` as a [channels] vector when, broadcast against the weighted node's output [N, C, ...] of
    rank ``rank``, it varies along the channel axis 1 only: [C,1,1] or [1,C,1,1] after a 2-D conv,
    [C] or [1,C] after a Gemm, or a single value. None when it would vary along another axis (a [C]
    constant after a conv broadcasts along the width) or raise the output's rank."""
    if c.ndim > rank:
        return None
    if c.size == 1:
        return np.full(channels, c.reshape(()).item())
    aligned = (1,) * (rank - c.ndim) + c.shape  # broadcasting aligns trailing axes
    if aligned != tuple(channels if axis == 1 else 1 for axis in range(rank)):
        return None
    return c.reshape(channels)


def _apply_affine(model, node, inits, bias, scale, shift) -> None:
    """Mutates: weights scaled per output channel; the bias becomes scale * bias + shift."""
    g = model.graph
    w_t = inits[node.input[1]]
    w = tensor_array(w_t, model)
    dtype = w.dtype  # the folded weight and bias keep the layer's own float type
    w = w.astype(np.float64)
    if node.op_type == "Conv":
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif node.op_type == "ConvTranspose":
        group = node_attr(node, "group", 1)
        grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        grouped = grouped * scale.reshape((group, 1, -1) + (1,) * (w.ndim - 2))
        w = grouped.reshape(w.shape)
    else:
        w = w * (scale[:, None] if node_attr(node, "transB", 0) else scale[None, :])
    w_t.CopyFrom(numpy_helper.from_array(w.astype(dtype), w_t.name))
    new_bias = (bias * scale + shift).astype(dtype)
    if len(node.input) > 2 and node.input[2]:
        b_t = inits[node.input[2]]
        b_t.CopyFrom(numpy_helper.from_array(new_bias, b_t.name))
    else:
        name = NameScope.of(model).unique_name(f"{node.name}_bias")
        g.initializer.append(numpy_helper.from_array(new_bias, name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    if node.op_type == "Gemm":
        _set_gemm_beta_one(node)


def _current_bias(node, inits, channels) -> np.ndarray | None:
    """The bias as a [channels] vector, or None when it is not a per-channel constant."""
    if len(node.input) < 3 or not node.input[2]:
        return np.zeros(channels)
    if node.input[2] not in inits:
        return None
    b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
    if node.op_type != "Gemm":
        return b if b.shape == (channels,) else None
    b = _per_channel(b, channels, 2)  # Gemm's C broadcasts: [C], [1,C] or one value, not [C,1] nor [M,C]
    return None if b is None else b * node_attr(node, "beta", 1.0)


def _set_gemm_beta_one(node: onnx.NodeProto) -> None:
    for a in node.attribute:
        if a.name == "beta":
            a.f = 1.0
