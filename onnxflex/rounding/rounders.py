"""Weight rounders behind one interface, and the step policies that train them.

Every rounder holds one float weight and its quantization grid (signed ``bits``, symmetric, one step
per output channel along ``axis``, zero point 0), and offers:
  fake_quant() -> Tensor   the quantized-then-dequantized weight, differentiable (straight-through);
                           in training mode a rounder may round softly (AdaRound), in eval mode
                           (the default outside reconstruction) it is exactly what export() writes;
  param_groups()           [(parameters, learning-rate name)] for the reconstruction optimiser;
  regularizer(progress)    an extra loss term at ``progress`` = iteration / iterations, or None;
  export() -> QuantizedWeight   the integers and scales that reproduce fake_quant() exactly.

A rounder class names its ``policy``: the StepPolicy that updates a block's parameters (Adam with
cosine decay by default; SignRound's signed gradient descent in signround.py). RTN and FlexRound
live here; AdaRound and SignRound in their own modules, imported at the end so that ROUNDERS is
complete whichever module is imported first.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from onnxflex.config import QuantConfig
from onnxflex.registry import Registry
from onnxflex.qparams import QuantizedWeight, channel_shape
from onnxflex.rounding.quant import round_ste, signed_range

ParamGroups = Sequence[tuple[Sequence[torch.nn.Parameter], str]]

ROUNDERS: Registry[type] = Registry("rounding method")

GRID = torch.linspace(0.5, 1.0, 21)


def init_weight_scale(w: torch.Tensor, axis: int, bits: int, search: str) -> torch.Tensor:
    """Per-channel step [C]: max|w|/qmax, or the clip ratio on a grid that minimises squared error."""
    qmin, qmax = signed_range(bits)
    dims = [d for d in range(w.ndim) if d != axis]
    absmax = w.abs().amax(dim=dims).clamp_min(1e-12) if dims else w.abs().clamp_min(1e-12)
    if search == "minmax":
        return absmax / qmax
    shape = channel_shape(w.ndim, axis)
    best_err, best = None, absmax / qmax
    for ratio in GRID.tolist():
        s = (absmax * ratio / qmax).reshape(shape)
        err = ((torch.clamp(torch.round(w / s), qmin, qmax) * s - w) ** 2).sum(dim=dims) if dims else \
            (torch.clamp(torch.round(w / s), qmin, qmax) * s - w) ** 2
        if best_err is None:
            best_err, best = err, s.reshape(-1).clone()
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s.reshape(-1), best)
    return best


class StepPolicy:
    """How reconstruction updates one block's parameters; the loop runs, per iteration,

        loss = block loss;  zero_grad();  (loss + penalty(it)).backward();  step(it, loss.item())

    and calls finish() once after the last iteration. ``groups`` are the block's learnable
    [(parameters, lr kind)] with kinds 'lr', 'scale_lr' (rounders) and 'act_lr' (activation steps).
    With ``keep_best``, step() first remembers the parameters that produced the lowest loss seen and
    finish() restores them (best-loss restore); the loss is the minibatch's, before the update.
    """

    keep_best = False

    def __init__(self, rounders: Sequence["Rounder"], groups: ParamGroups, config: QuantConfig) -> None:
        self.rounders = list({id(r): r for r in rounders}.values())
        self.params = list({id(p): p for params, _ in groups for p in params}.values())
        self.iters = config.iters
        self.best_loss, self.best_state, self.best_iter = math.inf, None, -1

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def penalty(self, it: int) -> torch.Tensor | float:
        """The sum of the rounders' regularizers at iteration ``it`` (0.0 when none has one)."""
        terms = [t for r in self.rounders if (t := r.regularizer(it / max(self.iters, 1))) is not None]
        return torch.stack(terms).sum() if terms else 0.0

    @torch.no_grad()
    def step(self, it: int, loss: float) -> None:
        if self.keep_best and loss < self.best_loss:
            self.best_loss, self.best_iter = loss, it
            self.best_state = [p.detach().clone() for p in self.params]
        self.update(it)

    def update(self, it: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def finish(self) -> None:
        if self.keep_best and self.best_state is not None:
            for p, value in zip(self.params, self.best_state, strict=True):
                p.copy_(value)


class AdamCosine(StepPolicy):
    """Adam over the groups with their configured learning rates, each decayed to 0 on a cosine
    except the kinds in ``constant_kinds``, which keep their rate."""

    constant_kinds: frozenset[str] = frozenset()

    def __init__(self, rounders: Sequence["Rounder"], groups: ParamGroups, config: QuantConfig) -> None:
        super().__init__(rounders, groups, config)
        lrs = {"lr": config.lr, "scale_lr": config.scale_lr, "act_lr": config.act_lr}
        groups = [(list(params), kind) for params, kind in groups if params]
        self.opt = torch.optim.Adam([{"params": params, "lr": lrs[kind]} for params, kind in groups])
        span = max(config.iters, 1)

        def cosine(it: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(it, span) / span))

        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, [(lambda it: 1.0) if kind in self.constant_kinds else cosine for _, kind in groups])

    def update(self, it: int) -> None:
        self.opt.step()
        self.sched.step()


class Rounder(torch.nn.Module):
    """Shared state: the float weight (a buffer, never trained), bits, axis and the integer range.

    A rounder starts in eval mode; reconstruction switches it to training mode while it learns.
    """

    policy: type[StepPolicy] = AdamCosine

    def __init__(self, weight: torch.Tensor, axis: int, bits: int, scale_search: str = "mse") -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.axis, self.bits = axis, bits
        self.qmin, self.qmax = signed_range(bits)
        self.shape = channel_shape(weight.ndim, axis)
        self.register_buffer("init_scale", init_weight_scale(self.weight, axis, bits, scale_search))
        self.train(False)

    def param_groups(self) -> list[tuple[list[torch.nn.Parameter], str]]:
        return []

    def regularizer(self, progress: float) -> torch.Tensor | None:
        """Extra loss at ``progress`` in [0, 1) of the iterations; None when the method has none."""
        return None

    def scale(self) -> torch.Tensor:
        return self.init_scale

    def integers(self) -> torch.Tensor:
        raise NotImplementedError

    def fake_quant(self) -> torch.Tensor:
        return self.integers() * self.scale().reshape(self.shape)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        ints = torch.round(self.integers()).to(torch.int8).cpu().numpy()
        scale = self.scale().detach().float().cpu().numpy().astype(np.float32)
        return QuantizedWeight(ints, scale, np.zeros_like(scale, dtype=np.int8), self.axis, self.bits)


@ROUNDERS.register("rtn")
class RTNRounder(Rounder):
    """q = clamp(round(W / s)), s from min/max or the MSE grid; nothing is learned."""

    def integers(self) -> torch.Tensor:
        return torch.clamp(torch.round(self.weight / self.init_scale.reshape(self.shape)), self.qmin, self.qmax)


@ROUNDERS.register("flexround")
class FlexRounder(Rounder):
    """FlexRound: Ŵ = s1 · clamp(round_STE(W / (s1 · exp(δ2 + δ3 + δ4)))), s1 = s0 · exp(δ1).

    s0 [C] is the RTN step (grid search); δ1 [C], δ2 (weight-shaped), δ3 (per output channel) and
    δ4 (per input channel, Conv weights only) start at 0, so the first forward equals RTN bit for bit
    (exp(0) = 1 exactly; storing log s0 instead would not round-trip). Dividing by a learned
    element-wise scale makes the update of δ2 proportional to |W| (the reciprocal rule).
    """

    def __init__(self, weight: torch.Tensor, axis: int, bits: int, scale_search: str = "mse") -> None:
        super().__init__(weight, axis, bits, scale_search)
        self.delta1 = torch.nn.Parameter(torch.zeros_like(self.init_scale))
        self.delta2 = torch.nn.Parameter(torch.zeros_like(self.weight))
        self.delta3 = torch.nn.Parameter(torch.zeros([weight.shape[axis] if d == axis else 1
                                                      for d in range(weight.ndim)]))
        self.has_delta4 = weight.ndim > 2 and axis == 0
        in_shape = [weight.shape[1] if d == 1 else 1 for d in range(weight.ndim)]
        self.delta4 = torch.nn.Parameter(torch.zeros(in_shape), requires_grad=self.has_delta4)

    def param_groups(self):
        deltas = [self.delta2, self.delta3] + ([self.delta4] if self.has_delta4 else [])
        return [([self.delta1], "scale_lr"), (deltas, "lr")]

    def scale(self) -> torch.Tensor:
        return self.init_scale * torch.exp(self.delta1)

    def divisor(self) -> torch.Tensor:
        exponent = self.delta2 + self.delta3
        if self.has_delta4:
            exponent = exponent + self.delta4
        return self.scale().reshape(self.shape) * torch.exp(exponent)

    def integers(self) -> torch.Tensor:
        return torch.clamp(round_ste(self.weight / self.divisor()), self.qmin, self.qmax)


def make_rounder(method: str, weight: torch.Tensor, axis: int, bits: int, scale_search: str) -> Rounder:
    return ROUNDERS.get(method)(weight, axis, bits, scale_search)


def make_policy(method: str, rounders: Sequence[Rounder], groups: ParamGroups, config: QuantConfig
                ) -> StepPolicy | None:
    """The step policy of ``method`` for one block, or None when there is nothing to learn."""
    if config.iters == 0 or not any(params for params, _ in groups):
        return None
    return ROUNDERS.get(method).policy(rounders, groups, config)


from onnxflex.rounding import adaround, signround  # noqa: E402,F401  (they register themselves)

