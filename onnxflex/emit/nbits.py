"""Blocked 4-bit weights written as com.microsoft MatMulNBits where onnxruntime would not fuse them.

onnxruntime turns DequantizeLinear(INT4/UINT4, axis 0, block_size) → MatMul into its MatMulNBits
kernel when it loads the model, except (1.31, CPU) when the MatMul's output goes to a Relu or Clip:
it then keeps the DequantizeLinear and a float MatMul, which dequantizes the whole weight on every
run (a 4096x4096 Relu MLP ran 3.6x slower than FP32). For those MatMuls the emitter writes the node
onnxruntime's fusion would have made, so the two forms compute the same numbers:

- B: uint8 [N, ceil(K / G), G / 2], column n's integers along K in blocks of G (a short last block
  padded with zeros), two to a byte, the first in the low nibble, each as the unsigned value (signed
  integers + 8: the kernel's default zero point);
- scales: float32 [N * ceil(K / G)], column-major over (block, column);
- zero_points (asymmetric only): uint8 [N * ceil(ceil(K / G) / 2)], each column's block zero points
  packed the same way, a column's last high nibble zero when the block count is odd;
- attributes K, N, bits 4, block_size G and the accuracy level accuracy_level(K, N) picks.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxflex.graph import node_attr
from onnxflex.passes.control_flow import reads

UNFUSED_AFTER = ("Relu", "Clip")  # a MatMul whose only reader is one of these is not fused (module docstring)
MIN_BLOCK = 16
# Accuracy level 4 (int8 activations per block) is used from this K and N up, 0 (float) below. Measured
# once (onnxruntime 1.31 CPU, 1 thread, one MatMulNBits layer, G 32, M 1 and 16, best of 5, load ~2.6 on
# 2 cores): at 64x64 and 128x128 level 4 ran 1.0-1.25x level 0's time, at 256x256 0.74-0.77x, at 512x512
# and above 0.2-0.6x (4096x4096 M 1: 162 vs 671 us); 256x8210 0.32-0.63x.
LEVEL4_MIN_K = LEVEL4_MIN_N = 256


def accuracy_level(k: int, n: int) -> int:
    """MatMulNBits accuracy level for a K x N layer: 4 where its int8 kernel is faster (constants above)."""
    return 4 if k >= LEVEL4_MIN_K and n >= LEVEL4_MIN_N else 0


def write_unfused(g: onnx.GraphProto) -> int:
    """Mutates ``g``: each DequantizeLinear → MatMul pair that onnxruntime would leave unfused
    becomes one MatMulNBits under the MatMul's name; returns how many. Initializers no other node
    reads are dropped."""
    inits = {t.name: t for t in g.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in set(reads(node)):  # a node's subgraphs' reads of outer tensors count as its own
            users.setdefault(name, []).append(node)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    replaced: dict[int, onnx.NodeProto] = {}
    for dq in g.node:
        matmul = _unfused_matmul(dq, inits, users, producer, outputs)
        if matmul is not None:
            replaced[id(dq)] = None
            replaced[id(matmul)] = _matmul_nbits(dq, matmul, inits, g)
    if not replaced:
        return 0
    kept = [replaced.get(id(n), n) for n in g.node]
    del g.node[:]
    g.node.extend(n for n in kept if n is not None)
    read = {i for n in g.node for i in reads(n)} | {o.name for o in g.output}
    for i in reversed([i for i, t in enumerate(g.initializer) if t.name not in read]):
        del g.initializer[i]
    return len(replaced) // 2


def _unfused_matmul(dq: onnx.NodeProto, inits: dict, users: dict, producer: dict, outputs: set) -> onnx.NodeProto | None:
    """The MatMul ``dq`` feeds if the pair is one onnxruntime leaves unfused and MatMulNBits can hold."""
    if dq.op_type != "DequantizeLinear" or dq.output[0] in outputs:
        return None
    block, weight = node_attr(dq, "block_size", 0), inits.get(dq.input[0])
    if weight is None or weight.data_type not in (TensorProto.INT4, TensorProto.UINT4) or len(weight.dims) != 2:
        return None
    k = weight.dims[0]
    if node_attr(dq, "axis", 1) not in (0, -2) or block < MIN_BLOCK or block & (block - 1):
        return None
    if any(name and name not in inits for name in dq.input[1:]):
        return None
    readers = users.get(dq.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "MatMul" or list(readers[0].input).count(dq.output[0]) != 1:
        return None
    matmul = readers[0]
    a = producer.get(matmul.input[0])
    if matmul.input[1] != dq.output[0] or (a is not None and a.op_type == "DequantizeLinear"):
        return None
    after = users.get(matmul.output[0], [])
    if matmul.output[0] in outputs or len(after) != 1 or after[0].op_type not in UNFUSED_AFTER:
        return None
    return matmul


def _matmul_nbits(dq: onnx.NodeProto, matmul: onnx.NodeProto, inits: dict, g: onnx.GraphProto) -> onnx.NodeProto:
    """The MatMulNBits node for the pair, its initializers added to ``g`` (module docstring's layout)."""
    weight = inits[dq.input[0]]
    ints = numpy_helper.to_array(weight).astype(np.int16)
    if weight.data_type == TensorProto.INT4:
        ints = ints + 8
    k, n = ints.shape
    block = node_attr(dq, "block_size", 0)
    blocks = -(-k // block)  # a short last group is padded (the kernel reads K values of each column)
    padded = np.zeros((blocks * block, n), np.int16)
    padded[:k] = ints
    b = _pack_pairs(padded.T.reshape(n, blocks, block))
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32).T.reshape(-1)
    base = matmul.name or matmul.output[0]
    names = [f"{base}_nbits_B", f"{base}_nbits_scales"]
    g.initializer.extend([numpy_helper.from_array(b, names[0]), numpy_helper.from_array(scale, names[1])])
    if len(dq.input) > 2 and dq.input[2]:
        zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int16).T  # [N, blocks]
        if blocks % 2:
            zero = np.concatenate([zero, np.zeros((n, 1), np.int16)], axis=1)
        names.append(f"{base}_nbits_zero_points")
        g.initializer.append(numpy_helper.from_array(_pack_pairs(zero).reshape(-1), names[-1]))
    return helper.make_node("MatMulNBits", [matmul.input[0], *names], list(matmul.output), name=matmul.name,
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                            accuracy_level=accuracy_level(k, n))


def _pack_pairs(values: np.ndarray) -> np.ndarray:
    """uint8 of half the last axis: values 2i in the low nibble, 2i + 1 in the high one (each in [0, 15])."""
    v = values.astype(np.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)
