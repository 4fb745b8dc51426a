"""The start of an asymmetric weight grid: a step and an integer zero point per channel or group.

    q = clamp(round(W / s) + z, 0, 2^b − 1),   Ŵ = s · (q − z)

From the range [lo, hi] of each step's weights, widened to hold 0 (the zero point is an integer in
[0, 2^b − 1], so the grid always reaches 0): s = r · (hi − lo) / (2^b − 1), z = round(−r · lo / s), with
the clip ratio r = 1 (min/max) or, for the MSE search, the ratio on the symmetric search's grid of least
squared rounding error per step. A group whose weights all share one sign keeps its zero point at an
end of the range, so every level covers its side of 0.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from onnxflex.device import torch_threads
from onnxflex.rounding.quant import unsigned_range

RATIOS = torch.linspace(0.5, 1.0, 21)  # clip ratios of the weight step searches, symmetric and asymmetric
SEARCH_CHUNK = 1 << 18  # weight values per part of a step search (in_parts)


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
    residual = (torch.round(view / s).add_(z).clamp_(0, qmax).sub_(z).mul_(s)).sub_(view)
    return reduce_over(residual.square_() if p == 2.0 else residual.abs_().pow_(p), dims, "sum")


@torch.no_grad()
def init_asymmetric_grid(view: torch.Tensor, dims: tuple[int, ...], bits: int, search: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero point), each ``view`` reduced over ``dims`` (kept as size-1 dims), for ``bits``-bit
    unsigned integers; ``search`` is 'minmax' (r = 1) or 'mse' (the ratio of least squared error)."""
    _, qmax = unsigned_range(bits)
    lo = reduce_over(view, dims, "amin").clamp(max=0.0)
    hi = reduce_over(view, dims, "amax").clamp(min=0.0)
    if search == "minmax":
        return grid_at(lo, hi, 1.0, qmax)
    # steps are independent: searched a few rows at a time (in_parts), so that the candidates' temporaries
    # stay in cache (a 1024 x 4096 weight's 22 candidates at once made weight-sized temporaries seven times each)
    with in_parts(view, dims) as (keep, spans):
        parts = [_least_error(view.narrow(keep, i, n), lo.narrow(keep, i, n), hi.narrow(keep, i, n), dims, qmax)
                 for i, n in spans]
    return torch.cat([s for s, _ in parts], dim=keep), torch.cat([z for _, z in parts], dim=keep)


@contextmanager
def in_parts(view: torch.Tensor, dims: tuple[int, ...]):
    """A step search's parts: (keep, spans), ``keep`` the first dim of ``view`` not in ``dims`` (the one
    that holds the steps) and ``spans`` the (start, length) along it of parts of about SEARCH_CHUNK
    values (one part when ``keep`` is not 0: a part of columns reduces its tail in another order, and
    its steps would differ in the last bit from the whole weight's). Several parts run on one thread:
    a part's ops are small, and with OpenMP's threads sleeping between ops (measured when they slept at
    once; device.sleeping_waits) waking the second costs more than it gains (1024 x 2816 at g32,
    asymmetric: 0.21 s on 2 threads, 0.05 s on one; whole weights on 2: 0.21 s too). One part keeps
    torch's threads: its ops are long enough for a second thread to pay (512 x 8210 per channel at 8
    bits: 0.070 s on one thread, 0.038 s on two)."""
    keep = next(d for d in range(view.ndim) if d not in dims)
    count = view.shape[keep]
    width = max(1, SEARCH_CHUNK // max(1, view.numel() // count)) if keep == 0 else count
    spans = [(i, min(width, count - i)) for i in range(0, count, width)]
    with torch_threads(1 if len(spans) > 1 else None):
        yield keep, spans


def _least_error(view: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dims: tuple[int, ...], qmax: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (step, zero point) of least squared rounding error among min/max and the clipped grids."""
    best_s, best_z = grid_at(lo, hi, 1.0, qmax)
    best_err = rounding_error(view, best_s, best_z, dims, qmax)
    for ratio in RATIOS.tolist():
        s, z = grid_at(lo, hi, ratio, qmax)
        err = rounding_error(view, s, z, dims, qmax)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z
