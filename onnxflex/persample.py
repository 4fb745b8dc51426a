"""Which blocks compute every sample on its own: run on a batch of N samples, they give what N runs on one
sample each give (up to float summation order).

A model that fixes its batch at 1 is captured one sample per onnxruntime run, and a block's steps are
micro-batches of one sample (planning.fixed_batch_rounding). The torch side need not follow the model's
batch where nothing in the block depends on it: convolutions, pools, element-wise nodes whose constant
operands broadcast within a sample, concatenation and slicing off the batch axis. Such a block takes
each step's micro-batches as one batch and runs its evaluation and quantized outputs batch-wise
(reconstruct.BlockRunner.rounding_of); a block with a Reshape (its shape constant holds the batch),
a Shape, a control-flow node, a contrib op or an unknown rank keeps the model's batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import numpy_helper

from onnxflex.blocks import Block, BlockPlan
from onnxflex.graph import DEFAULT_DOMAINS, node_attr
from onnxflex.layout import Layout

# ops whose every output sample depends only on the same sample of their run-time inputs, whatever their
# attributes, with constant operands (weights, scales, slopes) that never carry a batch
_APART = {
    "Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization",
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Mish", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Identity", "Clip",
}
# element-wise ops with several operands: constant ones must broadcast within a sample (_broadcasts)
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "PRelu"}
_AXIS_OPS = {"Concat", "Softmax", "LogSoftmax", "Flatten"}  # per sample while their axis is not the batch's


@dataclass(frozen=True)
class _Facts:
    """What the checks read of the model: initializer shapes, the values of its small int initializers
    (Slice axes) and the known ranks of its tensors (value_info, inputs, outputs)."""

    constants: dict[str, tuple[int, ...]]
    ints: dict[str, list[int]]
    ranks: dict[str, int]


def apart_blocks(plan: BlockPlan, layout: Layout) -> set[str]:
    """The names of the blocks of ``plan`` that compute each sample apart (module docstring), given the
    cache's ``layout``: every input and output carries its samples on axis 0."""
    graph = plan.model.graph
    nodes = {n.name: n for n in graph.node}
    ints = {t.name: numpy_helper.to_array(t).reshape(-1).tolist() for t in graph.initializer
            if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(t.dims) <= 1
            and (not t.dims or t.dims[0] <= 16)}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.input, *graph.output)
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    facts = _Facts({t.name: tuple(t.dims) for t in graph.initializer}, ints, ranks)
    return {block.name for block in plan.blocks if _apart(block, nodes, facts, layout)}


def _apart(block: Block, nodes: dict, facts: _Facts, layout: Layout) -> bool:
    if not block.nodes or any(layout.axis(name) != 0 for name in (*block.inputs, *block.outputs)):
        return False
    made = set(block.inputs)
    for name in block.nodes:
        node = nodes[name]
        if node.domain not in DEFAULT_DOMAINS or not _node_apart(node, made, facts):
            return False
        made.update(o for o in node.output if o)
    return True


def _node_apart(node: onnx.NodeProto, made: set[str], facts: _Facts) -> bool:
    """Whether ``node`` keeps samples apart; ``made``: the run-time tensors (batch on axis 0) so far."""
    inputs = [i for i in node.input if i]
    constants = facts.constants
    if any(i not in made and i not in constants for i in inputs) or not any(i in made for i in inputs):
        return False
    op = node.op_type
    if op == "BatchNormalization":  # training mode normalizes by the batch's statistics
        return len(node.output) == 1 and not node_attr(node, "training_mode", 0)
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:  # its indices count the batch's values
        return False
    if op in _APART:
        return op not in ("Conv", "ConvTranspose") or all(i in constants for i in inputs[1:])
    if op in _ELEMENTWISE:
        return _broadcasts(inputs, made, facts)
    if op in _AXIS_OPS:  # Softmax's default axis: 1 before opset 13, -1 since (both off the batch in 2-D+)
        axis = node_attr(node, "axis", 1 if op == "Flatten" else -1)
        return all(i in made for i in inputs) and _off_batch(axis, facts.ranks.get(node.output[0]))
    if op == "Slice":  # opset 10+: starts, ends, axes, steps as inputs; axes must leave the batch's out
        rank = facts.ranks.get(inputs[0])
        axes = facts.ints.get(node.input[3]) if len(node.input) > 3 else None
        return rank is not None and axes is not None and all(_off_batch(a, rank) for a in axes)
    if op == "Resize":  # by scales: a sizes input names the batch's size
        sizes = node.input[3] if len(node.input) > 3 else ""
        return not sizes and all(i in constants for i in inputs[1:])
    if op == "Transpose":
        perm = node_attr(node, "perm")
        return perm is not None and perm[0] == 0
    return False


def _broadcasts(inputs: list[str], made: set[str], facts: _Facts) -> bool:
    """Whether the constant operands of an element-wise node broadcast within a sample: of lower rank
    than its widest run-time operand, or of the same rank with 1 on the batch axis."""
    if any(i in made and i not in facts.ranks for i in inputs):
        return False
    rank = max(facts.ranks[i] for i in inputs if i in made)
    shapes = [facts.constants[i] for i in inputs if i not in made]
    return rank >= 1 and all(len(s) < rank or (len(s) == rank and s[0] == 1) for s in shapes)


def _off_batch(axis: int, rank: int | None) -> bool:
    """Whether ``axis`` (negative: from the end of ``rank`` dims, None: unknown) is not axis 0."""
    return axis >= 1 or (axis < 0 and rank is not None and axis + rank >= 1)
