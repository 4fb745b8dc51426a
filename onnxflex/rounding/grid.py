"""The start of an asymmetric weight grid: a step and an integer zero point per channel or group.

    q = clamp(round(W / s) + z, 0, 2^b − 1),   Ŵ = s · (q − z)

From the range [lo, hi] of each step's weights, widened to hold 0 (the zero point is an integer in
[0, 2^b − 1], so the grid always reaches 0): s = r · (hi − lo) / (2^b − 1), z = round(−r · lo / s), with
the clip ratio r = 1 (min/max) or, for the MSE search, the ratio on the symmetric search's grid of least
squared rounding error per step. A group whose weights all share one sign keeps its zero point at an
end of the range, so every level covers its side of 0.
"""
from __future__ import annotations

import torch

from onnxflex.rounding.quant import unsigned_range

RATIOS = torch.linspace(0.5, 1.0, 21)  # clip ratios of the weight step searches, symmetric and asymmetric


def reduce_over(x: torch.Tensor, dims: tuple[int, ...], op: str) -> torch.Tensor:
    """``x`` reduced by ``op`` (sum, amin, amax) over ``dims`` keeping them; no dims: ``x`` itself."""
    return getattr(x, op)(dim=dims, keepdim=True) if dims else x


def grid_at(lo: torch.Tensor, hi: torch.Tensor, ratio: float, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero point) of the clipped range [ratio · lo, ratio · hi] on levels 0..qmax."""
    s = ((hi - lo) * ratio / qmax).clamp_min(1e-12)
    return s, torch.round(-lo * ratio / s).clamp_(0, qmax)


def rounding_error(view: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dims: tuple[int, ...], qmax: int,
                   p: float = 2.0) -> torch.Tensor:
    """Σ |s · (clamp(round(W / s) + z, 0, qmax) − z) − W|^p over ``dims`` (one value per step)."""
    residual = (torch.round(view / s).add_(z).clamp_(0, qmax).sub_(z).mul_(s)).sub_(view).abs_()
    return reduce_over(residual.square_() if p == 2.0 else residual.pow_(p), dims, "sum")


@torch.no_grad()
def init_asymmetric_grid(view: torch.Tensor, dims: tuple[int, ...], bits: int, search: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero point), each ``view`` reduced over ``dims`` (kept as size-1 dims), for ``bits``-bit
    unsigned integers; ``search`` is 'minmax' (r = 1) or 'mse' (the ratio of least squared error)."""
    _, qmax = unsigned_range(bits)
    lo = reduce_over(view, dims, "amin").clamp(max=0.0)
    hi = reduce_over(view, dims, "amax").clamp(min=0.0)
    best_s, best_z = grid_at(lo, hi, 1.0, qmax)
    if search == "minmax":
        return best_s, best_z
    best_err = rounding_error(view, best_s, best_z, dims, qmax)
    for ratio in RATIOS.tolist():
        s, z = grid_at(lo, hi, ratio, qmax)
        err = rounding_error(view, s, z, dims, qmax)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z
