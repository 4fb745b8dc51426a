"""What a graph pass is: a function (model, PassContext) -> model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import onnx

from onnxflex.options import PlanOptions


@dataclass
class PassContext:
    """What passes may read (the plan's options, onnxflex.options.PlanOptions) and the one thing they may add
    to (warnings for the user)."""

    config: PlanOptions
    warnings: list[str] = field(default_factory=list)


class Pass(Protocol):
    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto: ...
