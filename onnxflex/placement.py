"""Placement facts: what ONNX itself fixes about where Q/DQ may go, read by the planner and the checker.

The planner (passes/select.py, passes/partition.py), the emitter (emit/qdq.py) and the static check
rules (runtimes/rules.py) all need the same answers: which element types are float, which axis of a
weight is its output channel, which input of a residual Add is the skip, which opset blocked weights
need. Each answer lives here once, so a plan and the check of what it emitted cannot disagree.
"""
from __future__ import annotations

from typing import Container, Iterable, Mapping, Sequence

import onnx
from onnx import TensorProto

from onnxflex.graph import all_nodes, node_attr
from onnxflex.passes.control_flow import subgraphs
from onnxflex.runtimes.base import RECURRENT_OPS, WEIGHTED_OPS

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
"""Every floating-point element type: tensors that carry real-valued activations or weights."""

QUANTIZABLE_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
"""The float types QuantizeLinear reads and DequantizeLinear writes (no DOUBLE): only tensors of these
types can take an activation Q/DQ pair or be replaced by a dequantized weight."""

NUMPY_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})
"""The float types numpy holds (no BFLOAT16), so onnxruntime's Python API can return them for comparison."""

PER_CHANNEL_OPSET = 13
"""DequantizeLinear takes a per-axis scale (``axis``) from this default-domain opset on."""

BLOCKED_OPSET = 21
"""DequantizeLinear takes ``block_size`` and INT4/UINT4 inputs from this default-domain opset on."""


def weight_axes(node: onnx.NodeProto) -> tuple[int, int]:
    """(output-channel axis, input-channel axis) of a weighted node's weight (input 1): Conv [M, C/g, ...]
    (0, 1); ConvTranspose [C, M/g, ...] (1, 0); Gemm (0, 1) with transB=1, else [K, N] (1, 0) like MatMul."""
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "ConvTranspose":
        return 1, 0
    if node.op_type == "Gemm" and node_attr(node, "transB", 0):
        return 0, 1
    return 1, 0


def reduction_depth(node: onnx.NodeProto, dims: Sequence[int]) -> int:
    """Products summed into each output element of weighted ``node`` with a weight of shape ``dims``:
    Conv [M, C/g, kh, kw] → C/g·kh·kw (a depthwise conv: kh·kw); ConvTranspose [C, M/g, kh, kw] →
    C/g·kh·kw (an upper bound: strides spread the taps over the outputs); MatMul and Gemm → K, the
    weight's input-channel axis. The integer kernel's per-output cost is repaid only by a deep sum."""
    dims = [int(d) for d in dims]
    spatial = 1
    for d in dims[2:]:
        spatial *= d
    if node.op_type == "ConvTranspose":
        return max(dims[0] // max(int(node_attr(node, "group", 1)), 1), 1) * spatial
    if node.op_type == "Conv":
        return dims[1] * spatial
    return dims[weight_axes(node)[1]]


def channel_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis along which a weight of ``rank`` dims gets one step per channel, or None
    where onnxflex does not quantize the node (not a weighted op, or a MatMul weight that is not 2-D)."""
    if node.op_type not in WEIGHTED_OPS or (node.op_type == "MatMul" and rank != 2):
        return None
    return weight_axes(node)[0]


def declared_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor → element type, for the tensors the top-level graph declares (value_info, inputs, outputs;
    a later declaration wins). Callers count an undeclared tensor as FLOAT."""
    g = model.graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}


def output_point(out: str, users: Mapping[str, Sequence[onnx.NodeProto]], absorb: Container[str],
                 kept: Container[str] = ()) -> str:
    """The tensor that carries a weighted op's output Q on a fusing target: its output ``out``, or, when
    the only node reading ``out`` is an activation in ``absorb`` (the runtime fuses it into the op), that
    activation's output. ``users``: tensor → the nodes that read it; ``kept``: tensors read as they are
    (graph outputs), which stay the point."""
    follow = users.get(out, [])
    if out not in kept and len(follow) == 1 and follow[0].op_type in absorb:
        return follow[0].output[0]
    return out


LATER_LAYER_OPS = WEIGHTED_OPS + RECURRENT_OPS + ("DynamicQuantizeLSTM",)
"""Ops that make a tensor they (transitively) read no final output: a later layer absorbs its error."""


def final_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors of ``graph`` that reach the graph outputs through no later layer: no node in
    LATER_LAYER_OPS (nor a control-flow node whose subgraphs hold one) reads them, directly or through
    the nodes after them. A weighted op whose output point is one of them is the model's head (the
    Conv before a Sigmoid, the Gemm of the logits): no later layer absorbs its rounding, and its
    calibrated range clips exactly the outputs (classes, speech frames) that the calibration data did
    not show. Nodes must be in graph order (ONNX requires it)."""
    reaches: set[str] = set()
    for node in reversed(graph.node):
        inner = [n for _, sub in subgraphs(node) for n in all_nodes(sub)]
        if node.op_type in LATER_LAYER_OPS or any(n.op_type in LATER_LAYER_OPS for n in inner) or \
                any(o in reaches for o in node.output):
            reaches.update(i for n in [node, *inner] for i in n.input if i)  # outer reads included
    produced = {o for n in graph.node for o in n.output if o} | {i.name for i in graph.input}
    return produced - reaches


HEAD_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"})
"""Ops between a head's MatMul/Gemm and the graph output it writes (the logits): they move or retype values,
compute nothing."""


def head_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the MatMul and Gemm nodes of ``graph`` whose output is a graph output, directly or through
    HEAD_LAYOUT_OPS (their first input) only: a language model's lm_head, a classifier's last Gemm.
    Nothing later absorbs their rounding, and an LM's head sets every logit, so weight-only runs give
    them more bits (``head_bits``)."""
    producer = {o: n for n in graph.node for o in n.output if o}
    heads, pending = set(), [o.name for o in graph.output]
    seen: set[str] = set()
    while pending:
        tensor = pending.pop()
        node = producer.get(tensor)
        if tensor in seen or node is None:
            continue
        seen.add(tensor)
        if node.op_type in ("MatMul", "Gemm"):
            heads.add(node.name)
        elif node.op_type in HEAD_LAYOUT_OPS and node.input:
            pending.append(node.input[0])
    return heads


def residual_skips(nodes: Iterable[onnx.NodeProto], layer_outputs: Container[str],
                   constants: Container[str]) -> dict[str, onnx.NodeProto]:
    """Skip tensor → its Add, in graph order, for each Add of two run-time tensors (neither in
    ``constants``) of which at least one is in ``layer_outputs`` (tensors weighted ops write): the skip
    is the input other than the output of the latest such op, the one a runtime fuses the Add into.
    A tensor that is the skip of several Adds maps to the last of them."""
    nodes = list(nodes)
    position = {o: k for k, n in enumerate(nodes) for o in n.output if o in layer_outputs}
    skips: dict[str, onnx.NodeProto] = {}
    for node in nodes:
        if node.op_type != "Add" or len(node.input) != 2 or any(i in constants or not i for i in node.input):
            continue
        fused = [i for i in node.input if i in position]
        if fused:
            main = max(fused, key=position.__getitem__)
            skips.update({i: node for i in node.input if i != main})
    return skips
