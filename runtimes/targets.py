"""The deployment targets: ``--target`` name → Target, one explicit table.

A new target is one Target record registered here (a variant of a runtime is a ``dataclasses.replace``
of its Target); ``--target`` and the config read their names from this table. A runtime with its own
engine check or kernel list gets a module beside this one.
"""
from __future__ import annotations

from dataclasses import replace

from onnxflex.registry import Registry
from onnxflex.runtimes.base import Target
from onnxflex.runtimes.onnxruntime import ONNXRUNTIME
from onnxflex.runtimes.tensorrt import TENSORRT

TARGETS: Registry[Target] = Registry("target")
TARGETS.register("onnxruntime")(ONNXRUNTIME)
TARGETS.register("tensorrt")(TENSORRT)
# a deployment pinned to onnxruntime 1.14 or 1.15, which implement default-domain opsets up to 18: a newer
# model is converted down, and blocked 4-bit weights (they need opset 21) are refused
TARGETS.register("onnxruntime-1.14")(replace(ONNXRUNTIME, name="onnxruntime-1.14", max_opset=18))


def get_target(name: str) -> Target:
    """The target ``name``; unknown names raise RegistryError listing the known ones."""
    return TARGETS.get(name)
