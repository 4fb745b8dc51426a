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
live here; AdaRound and SignRound in their own modules; methods.py maps the --method names to them.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from onnxflex.options import RoundingOptions
from onnxflex.qparams import QuantizedWeight, channel_shape
from onnxflex.rounding.quant import round_ste, signed_range

ParamGroups = Sequence[tuple[Sequence[torch.nn.Parameter], str]]

GRID = torch.linspace(0.5, 1.0, 21)
SEARCH_CHUNK = 1 << 18  # weight values per step of the grid search


def grouped_view(w: torch.Tensor, axis: int, group_size: int) -> tuple[torch.Tensor, tuple[int, ...],
                                                                          tuple[int, ...]]:
    """(view, dims, scale shape): reducing ``view`` over ``dims`` leaves one value per step.

    Per channel (``group_size`` 0): ``w`` itself, every dim but ``axis``, steps [C]. Per group (2-D
    weights only): the input axis b = 1 - axis of length K split into [K/G, G], dims the G axis,
    steps of ``blocked_scale_shape(w.shape, b, G)`` ([K/G, N] for a MatMul weight [K, N], axis 1).
    """
    if not group_size:
        return w, tuple(d for d in range(w.ndim) if d != axis), (w.shape[axis],)
    b = 1 - axis
    if w.ndim != 2 or axis not in (0, 1) or w.shape[b] % group_size:
        raise ValueError(f"groups of {group_size} need a 2-D weight whose input axis {b} is a multiple of "
                         f"{group_size}; got shape {list(w.shape)}, axis {axis}")
    shape = list(w.shape)
    view = w.reshape(shape[:b] + [shape[b] // group_size, group_size] + shape[b + 1:])
    return view, (b + 1,), tuple(shape[b] // group_size if d == b else n for d, n in enumerate(shape))


def absmax_per_step(w: torch.Tensor, axis: int, group_size: int = 0) -> torch.Tensor:
    """max|w| over each step's elements (scale-shaped, at least 1e-12)."""
    view, dims, shape = grouped_view(w, axis, group_size)
    return (view.abs().amax(dim=dims, keepdim=True) if dims else view.abs()).clamp_min(1e-12).reshape(shape)


def init_weight_scale(w: torch.Tensor, axis: int, bits: int, search: str, group_size: int = 0) -> torch.Tensor:
    """Per-channel step [C] (or per-group, see grouped_view): max|w|/qmax, or the clip ratio on a grid
    that minimises the squared error of each channel (group)."""
    qmin, qmax = signed_range(bits)
    view, dims, shape = grouped_view(w, axis, group_size)
    absmax = (view.abs().amax(dim=dims, keepdim=True) if dims else view.abs()).clamp_min(1e-12)
    if search == "minmax":
        return (absmax / qmax).reshape(shape)
    # Steps are independent of each other: search a few of them at a time, so that the grid's
    # temporaries stay in cache instead of allocating (and page-faulting) weight-sized tensors per ratio.
    keep = next(d for d in range(view.ndim) if d not in dims)
    count = view.shape[keep]
    width = max(1, SEARCH_CHUNK // max(1, view.numel() // count)) if keep == 0 else count  # rows are contiguous
    parts = [_grid_search(view.narrow(keep, i, min(width, count - i)), absmax.narrow(keep, i, min(width, count - i)),
                          dims, qmin, qmax) for i in range(0, count, width)]
    return torch.cat(parts, dim=keep).reshape(shape)


def _grid_search(view: torch.Tensor, absmax: torch.Tensor, dims: tuple[int, ...], qmin: int, qmax: int
                 ) -> torch.Tensor:
    """The step absmax·ratio/qmax, ratio on GRID, of least squared rounding error over ``dims``."""
    best_err, best = None, absmax / qmax
    for ratio in GRID.tolist():
        s = absmax * ratio / qmax
        err = torch.div(view, s).round_().clamp_(qmin, qmax).mul_(s).sub_(view).square_()
        err = err.sum(dim=dims, keepdim=True) if dims else err
        if best_err is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
    return best


class StepPolicy:
    """How reconstruction updates one block's parameters; the loop runs, per iteration,

        loss = block loss;  zero_grad();  (loss + penalty(it)).backward();  step(it, loss.item())

    and calls finish() once after the last iteration, ``end`` (config.iters unless cut() brought it
    forward). ``groups`` are the block's learnable [(parameters, lr kind)] with kinds 'lr',
    'scale_lr' (rounders) and 'act_lr' (activation steps). With ``keep_best``, step() first remembers
    the parameters that produced the lowest loss seen and finish() restores them (best-loss restore);
    the loss is the minibatch's, before the update. Rates and regularizers follow schedule_step(it).
    """

    keep_best = False

    def __init__(self, rounders: Sequence["Rounder"], groups: ParamGroups, config: RoundingOptions) -> None:
        self.rounders = list({id(r): r for r in rounders}.values())
        self.params = list({id(p): p for params, _ in groups for p in params}.values())
        self.iters = self.end = config.iters
        self.cut_at, self.tail = None, 0
        self.best_loss, self.best_state, self.best_iter = math.inf, None, -1

    def schedule_step(self, it: int) -> float:
        """Where the schedule stands at step ``it``: ``it`` itself, or after cut(at, tail) at + (it − at) ·
        (iters − at) / tail, so that what remained of it (a cosine or linear decay, AdaRound's β) runs
        its course over the tail as it would have over the remaining iterations."""
        if self.cut_at is None or it < self.cut_at:
            return it
        return self.cut_at + (it - self.cut_at) * (self.iters - self.cut_at) / self.tail

    def cut(self, at: int, tail: int) -> None:
        """Make the schedule end ``tail`` steps after step ``at`` (once; nothing when it ends sooner anyway)."""
        if self.cut_at is None and 0 < tail and at + tail < self.end:
            self.cut_at, self.tail, self.end = at, tail, at + tail

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def penalty(self, it: int) -> torch.Tensor | float:
        """The sum of the rounders' regularizers at iteration ``it`` (0.0 when none has one)."""
        progress = self.schedule_step(it) / max(self.iters, 1)
        terms = [t for r in self.rounders if (t := r.regularizer(progress)) is not None]
        return torch.stack(terms).sum() if terms else 0.0

    @torch.no_grad()
    def step(self, it: int, loss: float) -> None:
        if self.keep_best and loss < self.best_loss:
            self.best_loss, self.best_iter = loss, it
            self.best_state = [p.detach().clone() for p in self.params]
        self.update(self.schedule_step(it))

    def update(self, at: float) -> None:
        """One update at schedule position ``at`` (schedule_step of the step: the iteration itself unless
        the schedule was cut); rates decay with ``at`` / iters."""
        raise NotImplementedError

    @torch.no_grad()
    def finish(self) -> None:
        if self.keep_best and self.best_state is not None:
            for p, value in zip(self.params, self.best_state, strict=True):
                p.copy_(value)


class EarlyStop:
    """Ends a block's learning early once its loss plateaus; update(it, loss) is True after the last step.

    A plateau: the smoothed loss has not improved on its best by ``REL_TOL`` (relative) for
    ``patience`` steps. The minibatch loss is noisy (each step sees other samples), so it is smoothed
    by an exponential moving average over half the patience, bias-corrected as Adam's moments are, and
    compared only once that many losses are in it (a lucky first minibatch must not set the bar). On a
    plateau the policy's schedule is cut to end ``patience`` steps later: its rates anneal over that
    tail as they would have by the last iteration, which is where much of a cosine schedule's gain
    comes. With ``patience`` 0 the policy runs its full schedule. Which state is kept at the end is the
    policy's business (the last one, or SignRound's best-loss restore).
    """

    REL_TOL = 0.01

    def __init__(self, policy: StepPolicy, patience: int) -> None:
        self.policy, self.patience = policy, patience
        self.span = max(patience / 2.0, 1.0)
        self.decay = 1.0 - 1.0 / self.span
        self.average, self.seen, self.best, self.since = 0.0, 0, math.inf, 0

    def update(self, it: int, loss: float) -> bool:
        if self.patience and self.plateaued(loss):
            self.policy.cut(it + 1, self.patience)
        return it + 1 >= self.policy.end

    def plateaued(self, loss: float) -> bool:
        self.seen += 1
        self.average = self.decay * self.average + (1.0 - self.decay) * loss
        if self.seen < self.span:
            return False
        smoothed = self.average / (1.0 - self.decay ** self.seen)
        if smoothed < self.best * (1.0 - self.REL_TOL):
            self.best, self.since = smoothed, 0
        else:
            self.since += 1
        return self.since >= self.patience


class AdamCosine(StepPolicy):
    """Adam (β = 0.9, 0.999, ε = 1e-8) over the groups with their configured learning rates, each
    decayed to 0 on a cosine except the kinds in ``constant_kinds``, which keep their rate.

    The update is torch.optim.Adam's multi-tensor (foreach) arithmetic op for op, which gives the same
    values as its single-tensor default on the CPU, with the rate LambdaLR would set at each step. It
    is written out because torch.optim's first use imports torch._dynamo (a second or more per
    process) and its step costs about half a millisecond of Python, a sizeable part of a small
    block's step; the foreach ops keep an accelerator's kernel launches per step few.
    """

    constant_kinds: frozenset[str] = frozenset()
    BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, rounders: Sequence["Rounder"], groups: ParamGroups, config: RoundingOptions) -> None:
        super().__init__(rounders, groups, config)
        lrs = {"lr": config.lr, "scale_lr": config.scale_lr, "act_lr": config.act_lr}
        self.groups = [(list(params), lrs[kind], kind in self.constant_kinds) for params, kind in groups if params]
        self.steps = {id(p): 0 for params, _, _ in self.groups for p in params}
        self.moments = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for params, _, _ in self.groups
                        for p in params}
        self.span = max(config.iters, 1)

    def rate(self, lr: float, constant: bool, at: float) -> float:
        """A group's learning rate at schedule position ``at``: ``lr``, or ``lr`` on a cosine from 1 to 0."""
        return lr if constant else lr * (0.5 * (1.0 + math.cos(math.pi * min(at, self.span) / self.span)))

    @torch.no_grad()
    def update(self, at: float) -> None:
        for params, lr, constant in self.groups:
            live = [p for p in params if p.grad is not None]  # as torch.optim: no gradient, no step
            if live:
                self._adam(live, self.rate(lr, constant, at))

    def _adam(self, params: list[torch.nn.Parameter], lr: float) -> None:
        for p in params:
            self.steps[id(p)] += 1
        steps = [float(self.steps[id(p)]) for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [self.moments[id(p)][0] for p in params]
        exp_avg_sqs = [self.moments[id(p)][1] for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1 - self.BETA1)
        torch._foreach_mul_(exp_avg_sqs, self.BETA2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - self.BETA2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - self.BETA2 ** t) ** 0.5 for t in steps])
        torch._foreach_add_(denom, self.EPS)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [(lr / (1 - self.BETA1 ** t)) * -1 for t in steps])


class Rounder(torch.nn.Module):
    """Shared state: the float weight (a buffer, never trained), bits, axis, group size and the
    integer range. ``axis`` is the output-channel axis; with ``group_size`` G > 0 (2-D weights) every
    step covers G consecutive elements along the input axis 1 - ``axis`` of one output channel, and
    the step tensors (``scale()``, FlexRound's δ1, SignRound's α) have ``grouped_view``'s scale shape.

    A rounder starts in eval mode; reconstruction switches it to training mode while it learns.
    """

    policy: type[StepPolicy] = AdamCosine

    def __init__(self, weight: torch.Tensor, axis: int, bits: int, scale_search: str = "mse",
                 group_size: int = 0) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.axis, self.bits, self.group_size = axis, bits, group_size
        self.qmin, self.qmax = signed_range(bits)
        self.shape = channel_shape(weight.ndim, axis)
        self.register_buffer("init_scale", init_weight_scale(self.weight, axis, bits, scale_search, group_size))
        self.train(False)

    def spread(self, steps: torch.Tensor) -> torch.Tensor:
        """A step-shaped tensor made broadcastable against the weight (differentiable)."""
        if self.group_size:
            return steps.repeat_interleave(self.group_size, dim=1 - self.axis)
        return steps.reshape(self.shape)

    def param_groups(self) -> list[tuple[list[torch.nn.Parameter], str]]:
        return []

    def regularizer(self, progress: float) -> torch.Tensor | None:
        """Extra loss at ``progress`` in [0, 1) of the iterations; None when the method has none."""
        return None

    def scale(self) -> torch.Tensor:
        return self.init_scale

    @torch.no_grad()
    def raise_steps(self, floor: torch.Tensor) -> int:
        """Mutates: the starting steps below ``floor`` (``init_scale``'s shape) are raised to it, before
        anything is learned; returns how many were. (An int32 bias needs its step, input step × weight
        step, large enough to fit: torchify.bias_limit.)"""
        low = self.init_scale < floor
        self.init_scale.copy_(torch.maximum(self.init_scale, floor))
        return int(low.sum())

    def integers(self) -> torch.Tensor:
        raise NotImplementedError

    def fake_quant(self) -> torch.Tensor:
        return self.integers() * self.spread(self.scale())

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """Per channel on ``axis``, or blocked (block_size G) on the input axis 1 - ``axis``."""
        ints = torch.round(self.integers()).to(torch.int8).cpu().numpy()
        scale = self.scale().detach().float().cpu().numpy().astype(np.float32)
        axis = 1 - self.axis if self.group_size else self.axis
        return QuantizedWeight(ints, scale, np.zeros_like(scale, dtype=np.int8), axis, self.bits, self.group_size)


class RTNRounder(Rounder):
    """q = clamp(round(W / s)), s from min/max or the MSE grid; nothing is learned."""

    def integers(self) -> torch.Tensor:
        return torch.clamp(torch.round(self.weight / self.spread(self.init_scale)), self.qmin, self.qmax)


class FlexRounder(Rounder):
    """FlexRound: Ŵ = s1 · clamp(round_STE(W / (s1 · exp(δ2 + δ3 + δ4)))), s1 = s0 · exp(δ1).

    s0 [C] (per group: [K/G, N]) is the RTN step (grid search); δ1 (s0's shape: per-group s1), δ2 (weight-shaped), δ3 (per output channel) and
    δ4 (per input channel, Conv weights only) start at 0, so the first forward equals RTN bit for bit
    (exp(0) = 1 exactly; storing log s0 instead would not round-trip). Dividing by a learned
    element-wise scale makes the update of δ2 proportional to |W| (the reciprocal rule).
    """

    def __init__(self, weight: torch.Tensor, axis: int, bits: int, scale_search: str = "mse",
                 group_size: int = 0) -> None:
        super().__init__(weight, axis, bits, scale_search, group_size)
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
        return self.spread(self.scale()) * torch.exp(exponent)

    def integers(self) -> torch.Tensor:
        return torch.clamp(round_ste(self.weight / self.divisor()), self.qmin, self.qmax)
