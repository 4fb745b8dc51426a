"""onnxruntime target (CPU and CUDA execution providers).

Weights int8 symmetric per output channel, activations uint8 per tensor, Q/DQ around every weighted op
and an int32 bias through DequantizeLinear, so that the QDQ optimizer of onnxruntime fuses
DQ → Conv/Gemm/MatMul → Q into QLinearConv / QGemm / QLinearMatMul. LSTMs become com.microsoft
DynamicQuantizeLSTM (int8 W and R, activations quantized at run time; passes/recurrent.py).
"""
from __future__ import annotations

from onnxflex.runtimes.base import Target

ONNXRUNTIME = Target(name="onnxruntime", recurrent_ops=("LSTM",), weight_only_zero_points=True)

INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulNBits",
                   "DynamicQuantizeMatMul", "QLinearAdd", "DynamicQuantizeLSTM")
