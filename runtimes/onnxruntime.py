"""onnxruntime target (CPU and CUDA execution providers).

Weights int8 symmetric per output channel, activations uint8 per tensor, Q/DQ around every weighted op
and an int32 bias through DequantizeLinear, so that the QDQ optimizer of onnxruntime fuses
DQ → Conv/Gemm/MatMul → Q into QLinearConv / QGemm / QLinearMatMul. LSTMs become com.microsoft
DynamicQuantizeLSTM (int8 W and R, activations quantized at run time; passes/recurrent.py).

On the CPU an integer kernel pays a fixed cost per output element (requantization, and the Q/DQ at a
float neighbour) that only a deep enough sum of products repays: depthwise convolutions, convolutions
over 1-3 input channels and MatMuls with a small K measured slower as QLinearConv / QLinearMatMul than
in float, so layers of reduction depth below ``float_depth`` (32) stay float by default.

A SiLU (Sigmoid → Mul) between two integer layers is written as com.microsoft QuickGelu (``fuse_silu``):
onnxruntime fuses it that way in a float model, but not once it has copied the DequantizeLinear the
Sigmoid and the Mul share (on YOLO-style detectors the unfused SiLUs and their extra DequantizeLinears
cost about a third of the run). A Softmax along an early axis of a Transpose's output runs before the
Transpose, along the axis that is then one of the last two (``softmax_before_transpose``): the CPU
Softmax moves any other axis to the end with a general strided transpose (8x slower on a YOLOv8 box head).
A Concat whose output is quantized reads its float inputs through Q/DQ on that output's step
(``quantize_concat_inputs``), the same integers, so that it runs as QLinearConcat.
"""
from __future__ import annotations

from onnx import TensorProto

from onnxflex.runtimes.base import Target

# blocked int8/uint8 (a weight-only head at 8 bits) fuses into MatMulNBits bits=8, which onnxruntime 1.31 runs on CPU
ONNXRUNTIME = Target(name="onnxruntime", recurrent_ops=("LSTM",), weight_only_zero_points=True, float_depth=32,
                     fuse_silu=True, softmax_before_transpose=True, quantize_concat_inputs=True,
                     blocked_weight_dtypes=(TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8, TensorProto.UINT8),
                     matmul_nbits=True)

INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulNBits",
                   "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearAdd", "DynamicQuantizeLSTM")
