"""Integer grids and straight-through rounding."""
from __future__ import annotations

import torch


def signed_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    return 0, (1 << bits) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward (as QuantizeLinear does); identity gradient backward."""
    return x + (torch.round(x) - x).detach()


