"""What a deployment runtime accepts, as data the emitter and the planner read."""
from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from onnxflex.registry import Registry


@dataclass(frozen=True)
class Target:
    """Placement and encoding rules of one runtime.

    act_dtype: integer type of quantized activations (uint8 → asymmetric with a zero point).
    quantize_outputs: Q/DQ on weighted-op outputs (after a trailing activation in `absorb`), so that
        the runtime can fuse DQ → op → Q into an integer kernel.
    absorb: activations that follow a weighted op and sit before its output Q (the runtime fuses them).
    int32_bias: the bias goes in as int32 through DequantizeLinear with scale s_x·s_w.
    min_opset: lowest opset the emitted model may use (per-channel DequantizeLinear needs 13).
    """

    name: str
    act_dtype: int = TensorProto.UINT8
    weight_dtype: int = TensorProto.INT8
    quantize_outputs: bool = True
    absorb: tuple[str, ...] = ("Relu", "Clip")
    int32_bias: bool = True
    min_opset: int = 13
    weighted_ops: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")

    @property
    def act_symmetric(self) -> bool:
        return self.act_dtype == TensorProto.INT8


TARGETS: Registry[Target] = Registry("target")


def get_target(name: str) -> Target:
    from onnxflex.runtimes import onnxruntime  # noqa: F401  (registers the built-in targets)

    return TARGETS.get(name)
