"""The plan stage: graph passes, then layer selection and partition into blocks (no data needed).

The two halves are separate because only the second depends on which layers are kept in float:
latency placement re-selects and re-partitions the canonical model per trial (``place``) without
running the passes again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import onnx

from onnxflex.blocks import BlockPlan
from onnxflex.calib import fixed_batch
from onnxflex.graph import load_model
from onnxflex.options import PlanOptions, Resolved, RoundingOptions
from onnxflex.passes.control_flow import control_flow_warnings
from onnxflex.passes.partition import partition
from onnxflex.passes.pipeline import PassContext, run_passes
from onnxflex.passes.recurrent import recurrent_layers, state_tensors
from onnxflex.passes.select import (activation_points, head_outputs, latency_floats, select_layers,
                                    unmatched_patterns)
from onnxflex.passes.select_inner import select_inner
from onnxflex.placement import head_nodes
from onnxflex.runtimes.targets import get_target

ACCUMULATE_SHARE = 0.25  # of the requested batch: micro-batches per step on a fixed-batch model


@dataclass(frozen=True)
class Planned:
    """What the plan stage hands on: the block plan of the canonical model (``plan.model``), the
    warnings the graph passes gave (a re-placed plan repeats them), the batch the model's inputs fix
    (None: dynamic) and the options as the run uses them (``rounding.batch_size`` is that fixed batch,
    ``rounding.accumulate`` the micro-batches each learning step then sums: see ``fixed_batch_rounding``)."""

    plan: BlockPlan
    pass_warnings: tuple[str, ...]
    fixed_batch: int | None
    config: Resolved


def plan(original: onnx.ModelProto, config: Resolved) -> Planned:
    """Run the passes on a copy of ``original`` and place the layers (``original`` is not changed)."""
    canonical, warnings = canonical_model(original, config.plan)
    fixed = fixed_batch(canonical)
    if fixed and fixed != config.rounding.batch_size:
        config = config.replace(rounding=fixed_batch_rounding(config.rounding, fixed))
    return Planned(place(canonical, config.plan, warnings), warnings, fixed, config)


def fixed_batch_rounding(rounding: RoundingOptions, fixed: int) -> RoundingOptions:
    """``rounding`` for a model whose inputs fix the batch at ``fixed`` samples: batches of ``fixed``;
    where that is fewer samples than requested, each step sums ``accumulate`` = ACCUMULATE_SHARE of
    the requested batch_size micro-batches (at least 1), since a step on one sample is too noisy to
    learn from (issue 16: FlexRound behind onnxruntime's calibrators on a [1,1,64,W] OCR model)."""
    accumulate = max(1, round(ACCUMULATE_SHARE * rounding.batch_size)) if fixed < rounding.batch_size else 1
    return rounding.replace(batch_size=fixed, accumulate=accumulate)


def canonical_model(model: onnx.ModelProto, config: PlanOptions) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """(the canonical model, the passes' warnings); runs on a copy, since passes may mutate their input."""
    ctx = PassContext(config)
    return run_passes(load_model(model), ctx), tuple(ctx.warnings)


def place(canonical: onnx.ModelProto, config: PlanOptions, warnings: tuple[str, ...] = ()) -> BlockPlan:
    """Select the quantizable layers and activation points of ``canonical`` (not changed) and partition
    it into blocks; the plan's warnings are ``warnings`` followed by those of the selection."""
    from onnxflex.rounding.torchify import torch_supported

    target = get_target(config.target)
    found = list(warnings)
    layers = select_layers(canonical, target, config)
    floats = latency_floats(canonical, layers, target, config)
    if floats and len(floats) == len(layers):  # an all-float model is no quantized model
        found.append(f"the latency rule would keep every one of the {len(layers)} layers float (each sums fewer "
                     f"than {target.float_depth} products per output), so all stay integer; such a model may "
                     "run slower than FP32 on the CPU (the report's latency_rules section has the ratio)")
        floats = ()
    floated = {layer for layer, _ in floats}
    layers = tuple(layer for layer in layers if layer not in floated)
    points = activation_points(canonical, layers, target, config)  # recurrent layers take float inputs
    recurrent, recurrent_warnings = recurrent_layers(canonical, target, config)
    found.extend(recurrent_warnings)
    inner_layers, inner_points, outer_points = select_inner(canonical, target, config)
    points += tuple(p for p in outer_points if p not in points)
    state = state_tensors(canonical)  # rounding state read back compounds at every call: never quantized
    points = tuple(p for p in points if p not in state)
    heads = tuple(p for _, p in head_outputs(canonical, layers, target) if p in points)
    placed = partition(canonical, layers + recurrent, points, config.granularity, torch_supported, (),
                       inner_layers, inner_points)
    in_torch = {n for b in placed.blocks if not b.unsupported for n in b.nodes}  # an If there runs in torch
    found.extend(control_flow_warnings(canonical, inner_layers, lambda node: node.name in in_torch))
    found.extend(unmatched_patterns(canonical, layers + recurrent + inner_layers, config))
    return dataclasses.replace(placed, warnings=tuple(found),
                               latency_floats=tuple((l.node, l.op_type, depth) for l, depth in floats),
                               head_points=heads,
                               heads=tuple(sorted(head_nodes(canonical.graph))))


def build_plan(model: onnx.ModelProto, config: PlanOptions) -> BlockPlan:
    """The block plan of ``model`` (passes, then ``place``)."""
    canonical, warnings = canonical_model(model, config)
    return place(canonical, config, warnings)


__all__ = ["ACCUMULATE_SHARE", "Planned", "build_plan", "canonical_model", "fixed_batch_rounding", "place", "plan"]
