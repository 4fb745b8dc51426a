"""Pass registry and the pass pipeline that turns a loaded model into a BlockPlan."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import onnx

from onnxflex.config import QuantConfig
from onnxflex.registry import Registry


@dataclass
class PassContext:
    """What passes may read (the config) and the one thing they may add to (warnings for the user)."""

    config: QuantConfig
    warnings: list[str] = field(default_factory=list)


class Pass(Protocol):
    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto: ...


PASSES: Registry[Pass] = Registry("pass")

PIPELINE = ("strip_qdq", "canonicalize", "fold_batchnorm", "fold_bias_add", "gemm_kn_weights")


def run_passes(model: onnx.ModelProto, ctx: PassContext, names: tuple[str, ...] = PIPELINE) -> onnx.ModelProto:
    from onnxflex.passes import canonicalize, fold_bn, gemm_weights, strip_qdq  # noqa: F401  (registers the built-in passes)

    for name in names:
        model = PASSES.get(name)(model, ctx)
    return model
