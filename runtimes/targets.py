"""The deployment targets: ``--target`` name → Target, one explicit table.

A new target is a module defining its Target (as data) plus one line here.
"""
from __future__ import annotations

from onnxflex.registry import Registry
from onnxflex.runtimes.base import Target
from onnxflex.runtimes.onnxruntime import ONNXRUNTIME
from onnxflex.runtimes.tensorrt import TENSORRT

TARGETS: Registry[Target] = Registry("target")
TARGETS.register("onnxruntime")(ONNXRUNTIME)
TARGETS.register("tensorrt")(TENSORRT)


def get_target(name: str) -> Target:
    """The target ``name``; unknown names raise RegistryError listing the known ones."""
    return TARGETS.get(name)
