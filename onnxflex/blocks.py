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
    """

    node: str
    op_type: str
    weight: str
    axis: int
    input: str
    bias: str | None = None
    bits: int = 8
    group_size: int = 0


@dataclass(frozen=True)
class Block:
    """A reconstruction unit: consecutive nodes in topological order.

    inputs: run-time tensors read from outside the block; outputs: tensors later blocks or the graph need.
    act_points: activation tensors this block quantizes (produced here, or graph inputs first read here).
    unsupported: 'OpType (node name)' of nodes with no torch converter; the block then runs in onnxruntime.
    """

    name: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layers: tuple[QuantLayer, ...]
    act_points: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """The canonical model and its ordered blocks. Every node of the graph is in exactly one block,
    except side nodes (masks, position ids: made from constants, int inputs and input shapes) that a
    later block reading their results repeats (passes/partition.py)."""

    model: onnx.ModelProto
    blocks: tuple[Block, ...]
    act_points: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def layers(self) -> tuple[QuantLayer, ...]:
        return tuple(layer for b in self.blocks for layer in b.layers)

    def describe(self) -> str:
        lines = [f"{len(self.blocks)} blocks, {len(self.layers)} quantizable layers, "
                 f"{len(self.act_points)} activation quant points"]
        for b in self.blocks:
            ops = ", ".join(f"{l.op_type}:{l.node}" for l in b.layers) or "no weighted op"
            lines.append(f"  {b.name}: {len(b.nodes)} nodes [{ops}]")
            lines.append(f"      in: {', '.join(b.inputs)}  out: {', '.join(b.outputs)}")
            if b.unsupported:
                lines.append(f"      runs in onnxruntime (no torch converter for {', '.join(b.unsupported)})")
        return "\n".join(lines)
