"""HQQ-style data-free steps: half-quadratic refinement of each weight step for weight-only low bits.

On onnxflex's symmetric grid (zero point 0) the step s of each channel or group is the only free
quantity. It is refined from the round-to-nearest step s0 by minimising the lp error (p < 1) of the
weight, ||W − s·q(s)||_p^p with q(s) = clamp(round(W / s)), which an outlier channel or a clipped
extreme weight pulls far less than the squared error does. The half-quadratic split adds an error
variable E and alternates, with a coupling β that grows by κ each round:

    q ← clamp(round(W / s))                    rounding at the current step
    E ← s · shrink_p((W / s − q), β)           the lp proximal step on the residual, in step units
    s ← <W − E, q> / <q, q>                    least squares fit of the step to the weight less E

shrink_p(x, β) = sign(x) · max(|x| − |x|^(p−1) / β, 0) keeps large (outlier) residuals in E and zeroes
small ones, so the step fits the bulk of the weights. Working in step units makes β independent of the
weight's magnitude. Each channel (group) keeps the step of least lp error seen, s0 included, so it is
never worse than round-to-nearest on that measure. Nothing is learned from data: the block loop only
calibrates the activation steps, as for RTN.

On an asymmetric grid (q = clamp(round(W / s) + z, 0, qmax), Ŵ = s · (q − z)) each round fits both: the
step by least squares on the levels q − z, then the zero point as the integer nearest to the mean of
q − (W − E) / s (HQQ's own zero-point update, rounded because the emitted zero points are integers).
The start is grid.py's (step, zero point); the pair of least lp error seen is kept.
"""
from __future__ import annotations

import torch

from onnxflex.rounding.grid import rounding_error
from onnxflex.rounding.rounders import Rounder, grouped_view


class HQQRounder(Rounder):
    """Round-to-nearest on steps refined by half-quadratic lp minimisation (see the module)."""

    reconstructs = False
    P, ROUNDS, BETA, KAPPA = 0.7, 20, 1.0, 1.01

    def __init__(self, weight: torch.Tensor, axis: int, bits: int, scale_search: str = "mse",
                 group_size: int = 0, asymmetric: bool = False) -> None:
        super().__init__(weight, axis, bits, scale_search, group_size, asymmetric)
        if asymmetric:
            step, zero = self.refined_pair(self.init_scale, self.init_zero)
            self.register_buffer("step", step)
            self.register_buffer("fit_zero", zero)
        else:
            self.register_buffer("step", self.refined(self.init_scale))

    @torch.no_grad()
    def refined_pair(self, start: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, zero point) of least lp error per channel (group) over the rounds from the asymmetric
        start (``start``'s shape each)."""
        view, dims, shape = grouped_view(self.weight, self.axis, self.group_size)
        real = grouped_view(torch.ones_like(self.weight), self.axis, self.group_size)[0]  # 0 on the padding
        count = _sum(real, dims)
        keep = [1 if d in dims else n for d, n in enumerate(view.shape)]
        s, z = start.reshape(keep), zero.reshape(keep)
        best_s, best_z = s, z
        best_err = rounding_error(view, s, z, dims, self.qmax, self.P)
        beta = self.BETA
        for _ in range(self.ROUNDS):
            q = torch.clamp(torch.round(view / s) + z, 0, self.qmax)
            target = view - s * _shrink(view / s - (q - z), beta, self.P)
            levels = q - z
            num, den = _sum(target * levels, dims), _sum(levels * levels, dims)
            s = torch.where(den > 0, num / den.clamp_min(1e-12), s).clamp_min(1e-12)
            z = torch.round(_sum((q - target / s) * real, dims) / count).clamp(0, self.qmax)
            err = rounding_error(view, s, z, dims, self.qmax, self.P)
            better = err < best_err
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
            best_err = torch.where(better, err, best_err)
            beta *= self.KAPPA
        return best_s.reshape(shape), best_z.reshape(shape)

    @torch.no_grad()
    def refined(self, start: torch.Tensor) -> torch.Tensor:
        """The step (``start``'s shape) of least lp error per channel (group) over the rounds from ``start``."""
        view, dims, shape = grouped_view(self.weight, self.axis, self.group_size)
        s = start.reshape([1 if d in dims else n for d, n in enumerate(view.shape)])
        best, best_err = s, self._lp_error(view, s, dims)
        beta = self.BETA
        for _ in range(self.ROUNDS):
            q = torch.clamp(torch.round(view / s), self.qmin, self.qmax)
            target = view - s * _shrink(view / s - q, beta, self.P)
            num, den = _sum(target * q, dims), _sum(q * q, dims)
            s = torch.where(den > 0, num / den.clamp_min(1e-12), s).clamp_min(1e-12)
            err = self._lp_error(view, s, dims)
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
            beta *= self.KAPPA
        return best.reshape(shape)

    def _lp_error(self, view: torch.Tensor, s: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        residual = torch.clamp(torch.round(view / s), self.qmin, self.qmax) * s - view
        return _sum(residual.abs().pow(self.P), dims)

    def scale(self) -> torch.Tensor:
        return self.step

    def zero(self) -> torch.Tensor | None:
        return self.fit_zero if self.asymmetric else None

    @torch.no_grad()
    def raise_steps(self, floor: torch.Tensor) -> int:
        """As Rounder.raise_steps, on the refined steps (the ones this rounder rounds with)."""
        super().raise_steps(floor)
        low = self.step < floor
        self.step.copy_(torch.maximum(self.step, floor))
        return int(low.sum())

    def integers(self) -> torch.Tensor:
        return torch.clamp(self.shift(torch.round(self.weight / self.spread(self.step))), self.qmin, self.qmax)


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The lp (p < 1) proximal step: sign(x) · max(|x| − |x|^(p−1) / β, 0)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp_min(1e-12).pow(p - 1) / beta)


def _sum(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x`` summed over ``dims`` keeping them (no dims: ``x`` itself, one element per step)."""
    return x.sum(dim=dims, keepdim=True) if dims else x
