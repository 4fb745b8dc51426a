"""Step policies: how reconstruction updates one block's learnable parameters.

The loop runs, per iteration, ``zero_grad(); (loss + penalty(it)).backward(); step(it, loss)`` and
``finish()`` once at the end (see StepPolicy). AdamCosine (Adam with cosine decay, written out) is the
default; a rounder class names its policy as ``policy``, so a method that trains differently defines
its policy beside its rounder (SignRound's signed descent in signround.py, AdaRound's constant rate in
adaround.py). EarlyStop cuts a policy's schedule short once the loss plateaus.

Policies see the rounders only through ``regularizer(progress)``, so this module imports no rounder.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

import torch

from onnxflex.options import RoundingOptions

ParamGroups = Sequence[tuple[Sequence[torch.nn.Parameter], str]]


class Regularized(Protocol):
    """What a policy needs of a rounder: its extra loss term at ``progress`` in [0, 1), or None."""

    def regularizer(self, progress: float) -> torch.Tensor | None: ...


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

    def __init__(self, rounders: Sequence[Regularized], groups: ParamGroups, config: RoundingOptions) -> None:
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

    def __init__(self, rounders: Sequence[Regularized], groups: ParamGroups, config: RoundingOptions) -> None:
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
