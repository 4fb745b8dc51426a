"""The refine stage: plan changes that need calibration data, each a refiner run in REFINERS' order.

A refiner is ``(plan, config, data, ctx) -> Refinement | None``: it returns a new plan (never changes
the one it is given), the config that plan runs under and its report section, or None when its
option is off (the plan stays and the section keeps its empty value). A new refiner is a function
here and one line of REFINERS.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import onnx

from onnxflex.blocks import BlockPlan
from onnxflex.calib import CalibrationSet
from onnxflex.options import Resolved
from onnxflex.planning import Planned, place
from onnxflex.progress import Progress

log = logging.getLogger("onnxflex")


@dataclass(frozen=True)
class RefineContext:
    """What refiners read besides the plan: the model as the user gave it (FP32 timing), the plan
    stage's pass warnings (for a re-placed plan), onnxruntime's providers and the progress display."""

    original: onnx.ModelProto
    pass_warnings: tuple[str, ...]
    providers: tuple[str, ...]
    progress: Progress


@dataclass(frozen=True)
class Refinement:
    plan: BlockPlan
    config: Resolved
    section: Any


def latency_placement(plan: BlockPlan, config: Resolved, data: CalibrationSet, ctx: RefineContext):
    """--optimize-latency (onnxflex/latency.py): the measured slower layers stay float, so the plan is
    re-placed with a config that excludes them."""
    if not config.refine.optimize_latency:
        return None
    from onnxflex.latency import choose_float_layers

    choice = choose_float_layers(ctx.original, plan, data, config.plan, config.rounding,
                                 config.refine.latency_threads, ctx.progress)
    if choice.float_layers:
        options = config.plan.replace(exclude_nodes=config.plan.exclude_nodes + choice.float_layers)
        config = config.replace(plan=options)
        plan = place(plan.model, options, ctx.pass_warnings)
    return Refinement(plan, config, choice.to_dict())


def layernorm_folding(plan: BlockPlan, config: Resolved, data: CalibrationSet, ctx: RefineContext):
    """--reparam-layernorm (passes/ln_reparam.py): per-channel LayerNorm ranges folded into the model."""
    if not config.refine.reparam_layernorm or not plan.act_points:
        return None
    from onnxflex.passes.ln_reparam import fold_layernorms

    plan, rows = fold_layernorms(plan, data, ctx.providers)
    if rows:
        log.info("folded per-channel ranges of %d LayerNorm outputs into their LayerNorms and readers", len(rows))
    return Refinement(plan, config, rows)


def mixed_precision(plan: BlockPlan, config: Resolved, data: CalibrationSet, ctx: RefineContext):
    """--bits-budget / --size-budget-mb (onnxflex/mixed.py): per-layer bits within the budget."""
    if not config.budgets.active:
        return None
    from onnxflex.mixed import choose_bits

    plan, allocation = choose_bits(plan, data, config.budgets, ctx.providers, ctx.progress)
    return Refinement(plan, config, allocation.to_dict())


Refiner = Callable[[BlockPlan, Resolved, CalibrationSet, RefineContext], "Refinement | None"]


@dataclass(frozen=True)
class Step:
    """One row of REFINERS: the report section it fills (and its value when the refiner does not run),
    the refiner, and whether its time goes into the report's timings under the section's name."""

    section: str
    refiner: Refiner
    empty: Any
    timed: bool


REFINERS = (
    Step("latency_placement", latency_placement, {}, timed=True),
    Step("layernorm_folds", layernorm_folding, [], timed=False),
    Step("mixed_precision", mixed_precision, {}, timed=True),
)


@dataclass(frozen=True)
class Refined:
    """The refine stage's record: the plan and config that capture and reconstruction run, every
    refiner's report section (REFINERS' order) and the seconds of the timed ones."""

    plan: BlockPlan
    config: Resolved
    sections: dict[str, Any]
    timings: dict[str, float]


def refine(planned: Planned, data: CalibrationSet, ctx: RefineContext, steps: tuple[Step, ...] = REFINERS
           ) -> Refined:
    """Runs each refiner on the plan the one before returned."""
    plan, config = planned.plan, planned.config
    sections: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for step in steps:
        t = time.perf_counter()
        done = step.refiner(plan, config, data, ctx)
        if done is None:
            sections[step.section] = step.empty
            continue
        if step.timed:
            timings[step.section] = round(time.perf_counter() - t, 3)
        plan, config, sections[step.section] = done.plan, done.config, done.section
    return Refined(plan, config, sections, timings)


__all__ = ["REFINERS", "Refined", "RefineContext", "Refinement", "Step", "refine"]
