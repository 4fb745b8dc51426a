"""What a deployment runtime accepts, as data the planner, the emitter and the checker read."""
from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")  # weights W and R, state carried between steps


@dataclass(frozen=True)
class Target:
    """Placement and encoding rules of one runtime.

    Encoding:
    act_dtype: integer type onnxflex writes for quantized activations (UINT8 → asymmetric with a zero
        point, INT8 → symmetric, zero point 0).
    act_dtypes: activation types the runtime runs as integers (what `onnxflex check` accepts).
    weight_dtype: integer type of weights on a symmetric grid (zero point 0, one step per output channel).
    weight_only_zero_points: weight-only layers (float activations) may use asymmetric weights, UINT8 per
        channel or blocked UINT4 with a zero point per step (onnxruntime: MatMulNBits with zero_points);
        what ``weight_grid=auto`` reads.
    blocked_weight_dtypes / blocked_weight_ops: integer types a weight may use with one blocked axis
        (DequantizeLinear ``block_size``, opset 21: INT4/UINT4 for 2-4 bits, and where listed INT8/UINT8
        for a 5-8 bit head), and the ops that run such weights.
    int32_bias: True → the bias goes in as int32 through DequantizeLinear with scale s_x·s_w;
        False → the bias stays a float initializer (the runtime quantizes it itself).

    Placement:
    quantize_outputs: Q/DQ on weighted-op outputs (after a trailing activation in `absorb`), so that
        the runtime can fuse DQ → op → Q into an integer kernel; False → none on weighted-op outputs.
    absorb: activations that follow a weighted op and sit before its output Q (the runtime fuses them).
    quantize_residual_add: Q/DQ on the skip input of an Add that joins a weighted op's output with
        another run-time tensor, so that the runtime fuses the Add into that op.
    fuse_silu: a SiLU, Mul(x, Sigmoid(x)), that reads an act point's DequantizeLinear is written as the
        runtime's one-op form (onnxruntime: com.microsoft QuickGelu, alpha 1; emit/silu.py), which it
        cannot form itself once it has given each reader of the DequantizeLinear its own copy.
    quantize_concat_inputs: a Concat whose output is an act point reads each float input through a Q/DQ
        pair of that point's step (the same integers; emit/concat.py), so that the runtime concatenates
        integers (onnxruntime: QLinearConcat) instead of floats between Q/DQ.
    softmax_before_transpose: a Softmax that reads a Transpose along an axis before the last two, which
        is one of the last two before the Transpose, runs first (the same values; emit/softmax.py): the
        runtime's Softmax along such an axis pays a general strided transpose (onnxruntime CPU).
    shared_concat_scales: every quantized input of a Concat must use one step (the runtime concatenates
        integers in place).
    matmul_nbits: a blocked 4-bit weight read only by a MatMul with a float A is written, with that
        MatMul, as one com.microsoft MatMulNBits with the accuracy level its shape runs fastest at
        (emit/nbits.py), not left to a fusion at the session's one level.

    Versions and checking:
    min_opset / max_opset: default-domain opsets the emitted model may use (per-channel
        DequantizeLinear needs 13; the runtime's parser reads up to max_opset; 0 = no known limit).
    float_depth: a weighted layer whose reduction depth (products summed per output element:
        Cin/groups·kh·kw for Conv, K for MatMul/Gemm; onnxflex.placement.reduction_depth) is below this
        runs slower as an integer kernel with its Q/DQ than in float, so the plan keeps it float unless
        every reader of its output is an integer layer (passes/select.latency_floats); 0 = off.
    recurrent_ops: recurrent ops the runtime runs with integer weights (onnxruntime: LSTM as
        com.microsoft DynamicQuantizeLSTM); the others stay float (passes/recurrent.py).
    runtime_check: how `onnxflex check` asks the runtime itself ('onnxruntime-graph': read the optimized
        graph; 'tensorrt-engine': build an engine where TensorRT and a GPU are present).
    """

    name: str
    act_dtype: int = TensorProto.UINT8
    act_dtypes: tuple[int, ...] = (TensorProto.UINT8, TensorProto.INT8)
    weight_dtype: int = TensorProto.INT8
    weight_only_zero_points: bool = False
    blocked_weight_dtypes: tuple[int, ...] = (TensorProto.INT4, TensorProto.UINT4)
    blocked_weight_ops: tuple[str, ...] = ("MatMul", "Gemm")
    int32_bias: bool = True
    quantize_outputs: bool = True
    absorb: tuple[str, ...] = ("Relu", "Clip")
    quantize_residual_add: bool = False
    shared_concat_scales: bool = False
    fuse_silu: bool = False
    softmax_before_transpose: bool = False
    quantize_concat_inputs: bool = False
    matmul_nbits: bool = False
    min_opset: int = 13
    max_opset: int = 0
    weighted_ops: tuple[str, ...] = WEIGHTED_OPS
    float_depth: int = 0
    recurrent_ops: tuple[str, ...] = ()
    runtime_check: str = "onnxruntime-graph"

    @property
    def act_symmetric(self) -> bool:
        """Activations are signed with zero point 0 (else unsigned with a calibrated zero point)."""
        return self.act_dtype == TensorProto.INT8

    @property
    def symmetric_only(self) -> bool:
        """Every activation zero point must be 0 (the runtime has no zero-point arithmetic)."""
        return all(dtype == TensorProto.INT8 for dtype in self.act_dtypes)
