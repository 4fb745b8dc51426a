"""Blocked 4-bit MatMul weights written as com.microsoft MatMulNBits, each with its own accuracy level.

onnxruntime turns DequantizeLinear(INT4/UINT4, axis 0, block_size) → MatMul into its MatMulNBits
kernel when it loads the model, at the one accuracy level the session asks for (default 4: int8
activations per block), and (1.31, CPU) not at all when the MatMul's output goes to a Relu or Clip:
it then keeps the DequantizeLinear and a float MatMul, which dequantizes the whole weight on every
run (a 4096x4096 Relu MLP ran 3.6x slower than FP32). Level 4 is slower than float on small layers
(the bundled LM at W4 g32: 1.45-1.64x FP32 fused by the session, 1.00-1.04x with its layers at level 0).
So the weights stage writes each such MatMul as the node onnxruntime's fusion would make, with the
level ``accuracy_level`` picks for its shape, straight from the quantized weight (no DequantizeLinear
form is built first); the two forms compute the same numbers at the same level:

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
from onnx import helper, numpy_helper

from onnxflex.qparams import QuantizedWeight

MIN_BLOCK = 16
# Accuracy level 4 (int8 activations per block) is used from this K and N up, 0 (float) below. Measured
# once (onnxruntime 1.31 CPU, 1 thread, one MatMulNBits layer, G 32, M 1 and 16, best of 5, load ~2.6 on
# 2 cores): at 64x64 and 128x128 level 4 ran 1.0-1.25x level 0's time, at 256x256 0.74-0.77x, at 512x512
# and above 0.2-0.6x (4096x4096 M 1: 162 vs 671 us); 256x8210 0.32-0.63x.
LEVEL4_MIN_K = LEVEL4_MIN_N = 256


def accuracy_level(k: int, n: int) -> int:
    """MatMulNBits accuracy level for a K x N layer: 4 where its int8 kernel is faster (constants above)."""
    return 4 if k >= LEVEL4_MIN_K and n >= LEVEL4_MIN_N else 0


def nbits_reader(name: str, qw: QuantizedWeight, readers: list[onnx.NodeProto],
                 quantized: set[str]) -> onnx.NodeProto | None:
    """The MatMul that MatMulNBits can take the place of for the weight ``name`` quantized as ``qw``:
    ``readers`` (the nodes of its graph that read ``name``, subgraph reads included) are one MatMul
    reading it once, as B; ``qw`` is 4-bit, 2-D, blocked along K (axis 0) in a power-of-two block of at
    least MIN_BLOCK; its A is not a tensor in ``quantized`` (one that gets a DequantizeLinear: an
    activation point or another weight). None otherwise."""
    if not qw.block_size or qw.bits > 4 or qw.ints.ndim != 2 or qw.axis not in (0, -2):
        return None
    if qw.block_size < MIN_BLOCK or qw.block_size & (qw.block_size - 1):
        return None
    if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].domain not in ("", "ai.onnx"):
        return None
    matmul = readers[0]
    if list(matmul.input) != [matmul.input[0], name] or matmul.input[0] == name or matmul.input[0] in quantized:
        return None
    return matmul


def matmul_nbits(matmul: onnx.NodeProto, qw: QuantizedWeight, names: list[str]) -> tuple[onnx.NodeProto,
                                                                                           list[onnx.TensorProto]]:
    """(the MatMulNBits that computes ``matmul`` with its B quantized as ``qw``, under the MatMul's name
    and output; its initializers B, scales and, for an asymmetric ``qw``, zero_points, named from
    ``names`` in that order) in the module docstring's layout. ``qw`` is one ``nbits_reader`` takes."""
    ints = qw.ints if qw.asymmetric else (qw.ints + np.int8(8)).view(np.uint8)  # [-8, 7] -> [0, 15]
    k, n = ints.shape
    block = qw.block_size
    blocks = -(-k // block)  # a short last group is padded (the kernel reads K values of each column)
    padded = np.zeros((n, blocks * block), np.uint8)
    padded[:, :k] = ints.T
    tensors = [numpy_helper.from_array(_pack_pairs(padded.reshape(n, blocks, block)), names[0]),
               numpy_helper.from_array(qw.scale.astype(np.float32).T.reshape(-1), names[1])]
    if qw.asymmetric:
        zero = np.zeros((n, blocks + blocks % 2), np.uint8)
        zero[:, :blocks] = qw.zero_point.T
        tensors.append(numpy_helper.from_array(_pack_pairs(zero).reshape(-1), names[2]))
    node = helper.make_node("MatMulNBits", [matmul.input[0], *(t.name for t in tensors)], list(matmul.output),
                            name=matmul.name, domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                            accuracy_level=accuracy_level(k, n))
    return node, tensors


def _pack_pairs(values: np.ndarray) -> np.ndarray:
    """uint8 of half the last axis: values 2i in the low nibble, 2i + 1 in the high one (uint8, each in [0, 15])."""
    return values[..., 0::2] | (values[..., 1::2] << 4)
