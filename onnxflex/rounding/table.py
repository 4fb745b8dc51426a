"""The rounding methods: ``--method`` name → rounder class, one explicit table.

A new method is a module defining its Rounder (and, when it trains differently, its StepPolicy as the
class's ``policy``) plus its line in ROUNDERS. The table names each class as "module:Class" and imports
it on first use, so that the config and the CLI read the method names without importing torch.
"""
from __future__ import annotations

import importlib

from onnxflex.errors import RegistryError

ROUNDERS = {  # --method name → its Rounder class; the first is the round-to-nearest start of the others
    "rtn": "onnxflex.rounding.rounders:RTNRounder",
    "flexround": "onnxflex.rounding.rounders:FlexRounder",
    "adaround": "onnxflex.rounding.adaround:AdaRounder",
    "signround": "onnxflex.rounding.signround:SignRounder",
    "hqq": "onnxflex.rounding.hqq:HQQRounder",
}
METHODS = tuple(ROUNDERS)


def rounder_class(method: str) -> type:
    """The Rounder class of ``method``; an unknown name raises RegistryError listing the known ones."""
    if method not in ROUNDERS:
        raise RegistryError(f"unknown rounding method {method!r}; known: {', '.join(sorted(ROUNDERS))}")
    module, name = ROUNDERS[method].split(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["METHODS", "ROUNDERS", "rounder_class"]
