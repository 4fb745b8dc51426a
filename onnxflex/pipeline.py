"""The quantize pipeline: the stages in order, each returning the frozen record the later ones read.

    plan         planning.plan         → Planned      passes, layer selection, blocks; the fixed batch
    hold out     stages.hold_out       → Samples      reconstruction / verification split, checks
    refine       refiners.refine       → Refined      latency placement, LayerNorm folding, mixed
                                                      precision: (plan, data) → plan, in REFINERS' order
    step budget  stages.step_budget    → StepBudget   steps per block (budget.py), None when off; after
                                                      capture when a layer's shape needs captured tensors
    capture      stages.capture_fp32   → Captured     FP32 block boundaries into the cache (the rows the
                                                      blocks read), FP32 outputs
    reconstruct  stages.reconstruct_blocks → Reconstructed  the block loop, exported parameters
    emit         stages.emit_model     → Emitted      the QDQ model
    verify       stages.verify_model   → Verified     onnxruntime against the simulation and FP32;
                                                      the latency ratio vs FP32 (report-only)

``run_pipeline`` returns a PipelineResult holding the records; report.build_report makes the report
from it, api.quantize wraps both in a QuantResult.
"""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import onnx

from onnxflex.blocks import BlockPlan
from onnxflex.cache import TensorCache
from onnxflex.config import QuantConfig
from onnxflex.device import resolve_device, sleeping_waits
from onnxflex.rounding.heap import small_pages
from onnxflex.graph import load_model
from onnxflex.options import Resolved, resolve
from onnxflex.planning import build_plan, plan
from onnxflex.progress import Progress
from onnxflex.refiners import RefineContext, Refined, refine
from onnxflex.sources import resolve_calibration
from onnxflex.stages import (Captured, Emitted, Reconstructed, Samples, Verified, admit, budget_before_capture,
                             capture_fp32, emit_model, hold_out, learners_of, open_checkpoint, reconstruct_blocks,
                             step_budget, verify_model)


@dataclass(frozen=True)
class PipelineResult:
    """Everything a run made and the report is built from. ``config`` is the options as the run used
    them (options.Resolved: the model's fixed batch, the layers latency placement keeps in float), ``prepared_seconds`` the time from
    the plan to the open checkpoint (the report's "passes")."""

    samples: Samples
    refined: Refined
    captured: Captured
    reconstructed: Reconstructed
    emitted: Emitted
    verified: Verified
    prepared_seconds: float

    @property
    def config(self) -> Resolved:
        return self.refined.config

    @property
    def plan(self) -> BlockPlan:
        return self.refined.plan

    @property
    def model(self) -> onnx.ModelProto:
        return self.emitted.model

    @property
    def params(self) -> Any:
        return self.reconstructed.params

    @property
    def verification(self) -> Any:
        return self.verified.verification


def run_pipeline(model: Any, calibration: Any, config: QuantConfig, progress: Progress) -> PipelineResult:
    """Quantize ``model`` (path or ModelProto) with ``calibration`` (any source onnxflex.sources takes),
    without numpy's huge page advice (rounding/heap.small_pages: fresh capture rows stall otherwise)."""
    sleeping_waits()
    with small_pages():
        return _run_pipeline(model, calibration, config, progress)


def _run_pipeline(model: Any, calibration: Any, config: QuantConfig, progress: Progress) -> PipelineResult:
    import torch

    original = load_model(model)
    given = resolve(config)
    data = resolve_calibration(calibration, original, model, given.data)
    t = time.perf_counter()
    torch.manual_seed(given.rounding.seed)
    device = resolve_device(given.capture.device)
    planned = plan(original, given)
    admit(planned, given)
    samples = hold_out(data, planned)
    refined = refine(planned, samples.recon,
                     RefineContext(original, planned.pass_warnings, device.providers, progress))
    checkpoint = open_checkpoint(refined, samples)
    prepared = round(time.perf_counter() - t, 3)
    early = budget_before_capture(refined, samples)
    budget = step_budget(refined, samples, device) if early else None
    with closing(TensorCache(refined.config.capture.max_cache_mb << 20)) as cache:
        captured = capture_fp32(original, refined, samples, cache, device, progress,
                                learners_of(refined, budget) if early else None)
        if not early:  # a layer's shape comes from captured tensors
            budget = step_budget(refined, samples, device, cache)
        reconstructed = reconstruct_blocks(refined, cache, checkpoint, device, progress, budget, captured.observers)
    emitted = emit_model(refined, reconstructed)
    verified = verify_model(emitted, refined, reconstructed, captured, samples, device, original)
    return PipelineResult(samples, refined, captured, reconstructed, emitted, verified, prepared)


__all__ = ["PipelineResult", "build_plan", "plan", "run_pipeline"]
