"""The block plan: what the passes hand to capture and reconstruction."""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx


@dataclass(frozen=True)
class QuantLayer:
    """One weighted node to quantize.

    weight: initializer name (the key under which its rounder stands in).
    axis: the weight's output-channel axis (Conv 0, ConvTranspose 1, Gemm 0 or 1 by transB, MatMul 1).
    input: the activation tensor the node reads (quantized when activations are).
    bias: bias initializer name, or None.
    bits: weight bits (the config's wbits unless a layer_bits pattern names the node).
    group_size: 0 for one step per output channel; G > 0 (weight-only MatMul) for one step per G
        consecutive input channels of each output channel (blocked on the input axis, 1 - ``axis``).
    owner, graph: for a layer inside a subgraph, the top-level control-flow node and the graph attribute
        that holds it ('then_branch', 'body'); its weight and bias are initializers of that subgraph.
        Empty for top-level layers.
    """

    node: str
    op_type: str
    weight: str
    axis: int
    input: str
    bias: str | None = None
    bits: int = 8
    group_size: int = 0
    owner: str = ""
    graph: str = ""


@dataclass(frozen=True)
class InnerPoint:
    """An activation quant point defined inside a subgraph: ``tensor`` is made (or is an input) in the
    graph attribute ``graph`` of the top-level control-flow node ``owner``."""

    tensor: str
    owner: str
    graph: str


@dataclass(frozen=True)
class Block:
    """A reconstruction unit: consecutive nodes in topological order.

    inputs: run-time tensors read from outside the block; outputs: tensors later blocks or the graph need.
    act_points: activation tensors this block quantizes (produced here, or graph inputs first read here).
    unsupported: 'OpType (node name)' of nodes with no torch converter; the block then runs in onnxruntime.
    inner_points: activation quant points inside the subgraphs of this block's control-flow nodes (whose
        layers are in ``layers`` with ``owner`` set); a block holding an If, Loop or Scan whose subgraphs
        have torch converters runs in torch (rounding/torchify.py), otherwise in onnxruntime.
    """

    name: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layers: tuple[QuantLayer, ...]
    act_points: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()
    inner_points: tuple[InnerPoint, ...] = ()

    @property
    def all_points(self) -> tuple[str, ...]:
        """Every tensor this block quantizes: top-level act points, then inner points."""
        return self.act_points + tuple(p.tensor for p in self.inner_points)


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """The canonical model and its ordered blocks. Every node of the graph is in exactly one block,
    except side nodes (masks, position ids: made from constants, int inputs and input shapes) that a
    later block reading their results repeats (passes/partition.py). ``latency_floats``: (node, op type,
    reduction depth) of the weighted layers the latency rule keeps float (passes/select.latency_floats).
    ``head_points``: the act points that are a head's output (passes/select.head_outputs). ``heads``: the
    MatMul/Gemm nodes that write a graph output (placement.head_nodes), quantized or not, in graph order."""

    model: onnx.ModelProto
    blocks: tuple[Block, ...]
    act_points: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    latency_floats: tuple[tuple[str, str, int], ...] = field(default=())
    head_points: tuple[str, ...] = field(default=())
    heads: tuple[str, ...] = field(default=())

    @property
    def layers(self) -> tuple[QuantLayer, ...]:
        return tuple(layer for b in self.blocks for layer in b.layers)

    def describe(self) -> str:
        nodes = len({l.node for l in self.layers})  # an LSTM's W and R are two layers of one node
        lines = [f"{len(self.blocks)} blocks, {nodes} quantizable layers, "
                 f"{len(self.act_points)} activation quant points"]
        for b in self.blocks:
            ops = ", ".join(dict.fromkeys(f"{l.op_type}:{l.node}" for l in b.layers)) or "no weighted op"
            lines.append(f"  {b.name}: {len(b.nodes)} nodes [{ops}]")
            lines.append(f"      in: {', '.join(b.inputs)}  out: {', '.join(b.outputs)}")
            if b.unsupported:
                lines.append(f"      runs in onnxruntime (no torch converter for {', '.join(b.unsupported)})")
        if self.latency_floats:
            lines.append("kept float by the latency rule (reduction depth): "
                         + ", ".join(f"{op}:{node} ({depth})" for node, op, depth in self.latency_floats))
        if self.heads:
            bits = {l.node: (l.bits, l.group_size) for l in self.layers}
            lines.append("heads: " + ", ".join(
                f"{node} ({bits[node][0]} bits{f', groups of {bits[node][1]}' if bits[node][1] else ''})"
                if node in bits else f"{node} (float)" for node in self.heads))
        if self.head_points:
            lines.append("head outputs (range mirrored about 0 where the calibration stays below 0): "
                         + ", ".join(self.head_points))
        return "\n".join(lines)
