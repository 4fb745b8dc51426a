"""The pass table and the pass pipeline that turns a loaded model into a canonical one.

A new pass is a function ``(model, PassContext) -> model`` in its own module plus one line here.
"""
from __future__ import annotations

import onnx

from onnxflex.passes.canonicalize import canonicalize
from onnxflex.passes.context import Pass, PassContext
from onnxflex.passes.fold_bn import fold_batchnorm, fold_bias_add
from onnxflex.passes.gemm_weights import gemm_kn_weights
from onnxflex.passes.pin_inputs import pin_inputs
from onnxflex.passes.strip_qdq import strip_qdq
from onnxflex.registry import Registry

__all__ = ["PASSES", "PIPELINE", "Pass", "PassContext", "run_passes"]

PASSES: Registry[Pass] = Registry("pass")
PASSES.register("strip_qdq")(strip_qdq)
PASSES.register("canonicalize")(canonicalize)
PASSES.register("pin_inputs")(pin_inputs)
PASSES.register("fold_batchnorm")(fold_batchnorm)
PASSES.register("fold_bias_add")(fold_bias_add)
PASSES.register("gemm_kn_weights")(gemm_kn_weights)

PIPELINE = ("strip_qdq", "canonicalize", "fold_batchnorm", "fold_bias_add", "gemm_kn_weights")


def run_passes(model: onnx.ModelProto, ctx: PassContext, names: tuple[str, ...] = PIPELINE) -> onnx.ModelProto:
    for name in names:
        model = PASSES.get(name)(model, ctx)
    return model
