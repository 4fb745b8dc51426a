"""The rounding methods: ``--method`` name → rounder class, one explicit table.

A new method is a module defining its Rounder (and, when it trains differently, its StepPolicy as the
class's ``policy``) plus one line here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from onnxflex.options import RoundingOptions
from onnxflex.registry import Registry
from onnxflex.rounding.adaround import AdaRounder
from onnxflex.rounding.hqq import HQQRounder
from onnxflex.rounding.policies import ParamGroups, StepPolicy
from onnxflex.rounding.rounders import FlexRounder, Rounder, RTNRounder
from onnxflex.rounding.signround import SignRounder

ROUNDERS: Registry[type] = Registry("rounding method")
ROUNDERS.register("rtn")(RTNRounder)
ROUNDERS.register("flexround")(FlexRounder)
ROUNDERS.register("adaround")(AdaRounder)
ROUNDERS.register("signround")(SignRounder)
ROUNDERS.register("hqq")(HQQRounder)


def make_rounder(method: str, weight: torch.Tensor, axis: int, bits: int, scale_search: str,
                 group_size: int = 0) -> Rounder:
    return ROUNDERS.get(method)(weight, axis, bits, scale_search, group_size)


def reconstructs(method: str) -> bool:
    """Whether the block loop learns anything for ``method`` (Rounder.reconstructs)."""
    return ROUNDERS.get(method).reconstructs


def make_policy(method: str, rounders: Sequence[Rounder], groups: ParamGroups, config: RoundingOptions
                ) -> StepPolicy | None:
    """The step policy of ``method`` for one block, or None when there is nothing to learn."""
    if config.iters == 0 or not any(params for params, _ in groups):
        return None
    return ROUNDERS.get(method).policy(rounders, groups, config)
