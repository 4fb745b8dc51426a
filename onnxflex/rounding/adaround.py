"""AdaRound (Nagel et al., 2020): learn, weight by weight, whether to round down or up.

    Ŵ = s · clamp(floor(W / s) + h(V), qmin, qmax),   h(V) = clamp(sigmoid(V) · (ζ − γ) + γ, 0, 1)

with ζ = 1.1, γ = −0.1 (the rectified sigmoid reaches 0 and 1 at finite V). The step s [C] (or per group) is the
round-to-nearest step of the configured scale search and stays fixed; only V (weight-shaped) learns.
On an asymmetric grid the integer zero point z of each step is added before the clamp to [0, 2^b − 1]
and stays at its start (an integer shift leaves the choice of rounding up or down unchanged).
"""
from __future__ import annotations

import torch

from onnxflex.rounding.policies import AdamCosine
from onnxflex.rounding.rounders import Rounder

ZETA, GAMMA = 1.1, -0.1


class AdamConstantRounding(AdamCosine):
    """Adam; the rounding variables V keep a constant learning rate (the regulariser's annealing is
    their schedule, and it needs V to keep moving until the end), step sizes decay on the cosine."""

    constant_kinds = frozenset({"lr"})


class AdaRounder(Rounder):
    """AdaRound with the annealed regulariser λ · mean(1 − |2h(V) − 1|^β).

    Training mode rounds softly (Ŵ uses h(V) itself); eval mode and export round up where
    h(V) >= 0.5. V starts where h(V) is the fractional part of W / s, with its sign set so that the
    hard rounding at the start is round-to-nearest (half to even) bit for bit. The regulariser is
    off for the first ``WARMUP`` of the iterations (the loss alone moves V), then β falls linearly
    from ``BETA_START`` (flat except near 0 and 1: only weights already close to an integer are
    pushed) to ``BETA_END`` (every h is pushed to 0 or 1), so the soft and hard weights agree by the
    end. The mean over weights keeps λ independent of the layer's size, like the block loss (a mean
    over output elements) it is added to.
    """

    policy = AdamConstantRounding
    LAMBDA = 1.0
    WARMUP = 0.2
    BETA_START, BETA_END = 20.0, 2.0

    def __init__(self, weight: torch.Tensor, axis: int, bits: int, scale_search: str = "mse",
                 group_size: int = 0, asymmetric: bool = False) -> None:
        super().__init__(weight, axis, bits, scale_search, group_size, asymmetric)
        self.register_buffer("floor", torch.zeros_like(self.weight))
        self.v = torch.nn.Parameter(torch.zeros_like(self.weight))
        self._start()

    @torch.no_grad()
    def _start(self) -> None:
        """floor and V from the current starting step (round-to-nearest, half to even)."""
        x = self.weight / self.spread(self.init_scale)
        self.floor.copy_(torch.floor(x))
        frac = x - self.floor
        p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
        v = torch.log(p / (1 - p)).abs().clamp_min(1e-6)  # h(V) >= 0.5 exactly when V >= 0
        up = torch.round(x) > self.floor
        self.v.copy_(torch.where(up, v, -v))

    @torch.no_grad()
    def raise_steps(self, floor: torch.Tensor) -> int:
        """As Rounder.raise_steps; floor and V start again from the raised steps."""
        low = super().raise_steps(floor)
        if low:
            self._start()
        return low

    def param_groups(self):
        return [([self.v], "lr")]

    def h(self) -> torch.Tensor:
        """The rectified sigmoid h(V) in [0, 1], weight-shaped."""
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def integers(self) -> torch.Tensor:
        offset = self.h() if self.training else (self.v >= 0).to(self.weight.dtype)
        return torch.clamp(self.shift(self.floor + offset), self.qmin, self.qmax)

    def beta(self, progress: float) -> float | None:
        """β at ``progress`` = iteration / iterations; None during the warm-up."""
        if progress < self.WARMUP:
            return None
        t = (progress - self.WARMUP) / (1.0 - self.WARMUP)
        return self.BETA_START + (self.BETA_END - self.BETA_START) * t

    def regularizer(self, progress: float) -> torch.Tensor | None:
        beta = self.beta(progress)
        if beta is None:
            return None
        return self.LAMBDA * (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).mean()
