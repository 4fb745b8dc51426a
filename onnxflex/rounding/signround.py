"""SignRound (AutoRound, arXiv 2309.05516): rounding offsets and clip factors learned by signed
gradient descent with a linearly decaying step, keeping the best state seen.

    Ŵ = s · clamp(round_STE(W / s + v), qmin, qmax),   s = α · max|W| / qmax   (per output channel)

On an asymmetric grid two clip factors are learned, α on the maximum and α_min on the minimum:

    s = (α · hi − α_min · lo) / qmax,   z = round_STE(−α_min · lo / s),
    Ŵ = s · (clamp(round_STE(W / s + v) + z, 0, qmax) − z)

with [lo, hi] each step's range widened to hold 0 (grid.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from onnxflex.options import RoundingOptions
from onnxflex.rounding.quant import round_ste
from onnxflex.rounding.policies import AdamCosine, ParamGroups, StepPolicy
from onnxflex.rounding.grid import reduce_over
from onnxflex.rounding.rounders import Rounder, absmax_per_step, grouped_view

V_BOUND = 0.5
CLIP_BOUNDS = (0.5, 1.0)


class SignedDescent(StepPolicy):
    """p ← p − lr_t · sign(∂L/∂p) for the rounders' offsets and clip factors, lr_t = lr · (1 − t / T)
    at iteration t of T. The config's lr defaults to 1/T for SignRound (5e-3 at its default 200
    iterations): the steps then sum to about 0.5, so an offset can just cross its [−0.5, 0.5] range
    and a clip factor its [0.5, 1]. Parameters are clamped to their ranges after every step.
    Activation step sizes keep Adam with cosine decay (act_lr) as in the other methods. The state
    that gave the lowest minibatch loss is restored at the end (best-loss restore, as AutoRound).
    """

    keep_best = True

    def __init__(self, rounders: Sequence[Rounder], groups: ParamGroups, config: RoundingOptions) -> None:
        super().__init__(rounders, groups, config)
        self.lr = config.lr
        self.signed = [p for params, kind in groups if kind != "act_lr" for p in params]
        acts = [(params, kind) for params, kind in groups if kind == "act_lr" and params]
        self.acts = AdamCosine(rounders, acts, config) if acts else None

    def step_size(self, it: int) -> float:
        return self.lr * (1.0 - it / self.iters)

    def update(self, it: int) -> None:
        lr = self.step_size(it)
        for p in self.signed:
            if p.grad is not None:
                p.sub_(lr * torch.sign(p.grad))
        for r in self.rounders:
            if isinstance(r, SignRounder):
                r.clamp_()
        if self.acts is not None:
            self.acts.update(it)


class SignRounder(Rounder):
    """SignRound on a symmetric grid: a per-weight offset v in [−0.5, 0.5] added before rounding and
    a per-channel (with a group size: per-group) clip factor α in [0.5, 1] on max|W|.

    On a symmetric grid (zero point 0: what onnxruntime's integer kernels and TensorRT take) the
    min/max clip factors of an asymmetric grid become one symmetric clip of max|W| per channel; on an
    asymmetric grid (weight-only) both are learned (see the module).
    v starts at 0 and α at the ratio the configured scale search chose (1 for min/max), so the
    first forward is round-to-nearest on that grid. Export writes the clamped integers and s.
    """

    policy = SignedDescent

    def __init__(self, weight: torch.Tensor, axis: int, bits: int, scale_search: str = "mse",
                 group_size: int = 0, asymmetric: bool = False) -> None:
        super().__init__(weight, axis, bits, scale_search, group_size, asymmetric)
        self.v = torch.nn.Parameter(torch.zeros_like(self.weight))
        if asymmetric:
            self._start_asymmetric()
            return
        self.register_buffer("absmax", absmax_per_step(self.weight, axis, group_size))
        self.alpha = torch.nn.Parameter((self.init_scale * self.qmax / self.absmax).clamp(*CLIP_BOUNDS))

    def _start_asymmetric(self) -> None:
        """The range [lo, hi] of each step (holding 0) and both clip factors at the ratio the scale
        search chose."""
        view, dims, shape = grouped_view(self.weight, self.axis, self.group_size)
        self.register_buffer("lo", reduce_over(view, dims, "amin").clamp(max=0.0).reshape(shape))
        self.register_buffer("hi", reduce_over(view, dims, "amax").clamp(min=0.0).reshape(shape))
        ratio = (self.init_scale * self.qmax / (self.hi - self.lo).clamp_min(1e-12)).clamp(*CLIP_BOUNDS)
        self.alpha = torch.nn.Parameter(ratio.clone())
        self.alpha_min = torch.nn.Parameter(ratio.clone())

    def param_groups(self):
        if self.asymmetric:
            return [([self.v], "lr"), ([self.alpha, self.alpha_min], "scale_lr")]
        return [([self.v], "lr"), ([self.alpha], "scale_lr")]

    def scale(self) -> torch.Tensor:
        if self.asymmetric:
            return ((self.alpha * self.hi - self.alpha_min * self.lo) / self.qmax).clamp_min(1e-12)
        return self.alpha * self.absmax / self.qmax

    def zero(self) -> torch.Tensor | None:
        if not self.asymmetric:
            return None
        return torch.clamp(round_ste(-self.alpha_min * self.lo / self.scale()), self.qmin, self.qmax)

    @torch.no_grad()
    def raise_steps(self, floor: torch.Tensor) -> int:
        """As Rounder.raise_steps, on the clipped range this rounder's step comes from."""
        low = super().raise_steps(floor)
        self.absmax.copy_(torch.maximum(self.absmax, floor * self.qmax / self.alpha))
        return low

    def integers(self) -> torch.Tensor:
        return torch.clamp(self.shift(round_ste(self.weight / self.spread(self.scale()) + self.v)),
                           self.qmin, self.qmax)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep v and α inside their ranges (after a step of the policy)."""
        self.v.clamp_(-V_BOUND, V_BOUND)
        self.alpha.clamp_(*CLIP_BOUNDS)
        if self.asymmetric:
            self.alpha_min.clamp_(*CLIP_BOUNDS)
