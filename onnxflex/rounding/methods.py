"""What the block loop asks of a rounding method: its rounder for a weight, whether it learns, its
step policy. The methods themselves are the table in rounding/table.py."""
from __future__ import annotations

from typing import Sequence

import torch

from onnxflex.options import RoundingOptions
from onnxflex.rounding.policies import ParamGroups, StepPolicy
from onnxflex.rounding.rounders import Rounder
from onnxflex.rounding.table import rounder_class


def make_rounder(method: str, weight: torch.Tensor, axis: int, bits: int, scale_search: str,
                 group_size: int = 0, asymmetric: bool = False) -> Rounder:
    """The rounder of ``method`` for one weight, on a symmetric grid or (``asymmetric``) an unsigned
    grid with a zero point per step (Rounder)."""
    if asymmetric:
        return rounder_class(method)(weight, axis, bits, scale_search, group_size, asymmetric=True)
    return rounder_class(method)(weight, axis, bits, scale_search, group_size)


def reconstructs(method: str) -> bool:
    """Whether the block loop learns anything for ``method`` (Rounder.reconstructs)."""
    return rounder_class(method).reconstructs


def make_policy(method: str, rounders: Sequence[Rounder], groups: ParamGroups, config: RoundingOptions
                ) -> StepPolicy | None:
    """The step policy of ``method`` for one block, or None when there is nothing to learn."""
    if config.iters == 0 or not any(params for params, _ in groups):
        return None
    return rounder_class(method).policy(rounders, groups, config)
