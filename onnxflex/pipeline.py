"""The quantize pipeline, stage by stage: passes → plan → capture → reconstruct → emit → verify."""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import onnx

from onnxflex.blocks import BlockPlan
from onnxflex.calib import CalibrationSet, fixed_batch
from onnxflex.capture import TensorCache, capture
from onnxflex.device import resolve_device
from onnxflex.errors import CalibrationError
from onnxflex.emit import emit
from onnxflex.extdata import offload
from onnxflex.graph import load_model, name_nodes_uniquely
from onnxflex.options import PlanOptions, Resolved, RoundingOptions, VerifyOptions
from onnxflex.passes.control_flow import control_flow_warnings
from onnxflex.passes.custom_ops import check_custom_ops
from onnxflex.passes.partition import partition
from onnxflex.passes.pipeline import PassContext, run_passes
from onnxflex.passes.recurrent import recurrent_layers, state_tensors
from onnxflex.passes.select import activation_points, select_layers, unmatched_patterns
from onnxflex.passes.select_inner import select_inner
from onnxflex.progress import Progress
from onnxflex.runtimes.targets import get_target
from onnxflex.spill import check_free_disk

log = logging.getLogger("onnxflex")


def build_plan(model: onnx.ModelProto, config: PlanOptions) -> BlockPlan:
    """Run the graph passes and partition the result into blocks (no data needed)."""
    from onnxflex.rounding.torchify import torch_supported

    target = get_target(config.target)
    ctx = PassContext(config)
    canonical = run_passes(load_model(model), ctx)  # a copy: passes may mutate their input
    layers = select_layers(canonical, target, config)
    points = activation_points(canonical, layers, target, config)  # recurrent layers take float inputs
    recurrent, recurrent_warnings = recurrent_layers(canonical, target, config)
    ctx.warnings.extend(recurrent_warnings)
    inner_layers, inner_points, outer_points = select_inner(canonical, target, config)
    points += tuple(p for p in outer_points if p not in points)
    state = state_tensors(canonical)  # rounding state read back compounds at every call: never quantized
    points = tuple(p for p in points if p not in state)
    plan = partition(canonical, layers + recurrent, points, config.granularity, torch_supported, (),
                     inner_layers, inner_points)
    in_torch = {n for b in plan.blocks if not b.unsupported for n in b.nodes}  # an If there runs in torch
    ctx.warnings.extend(control_flow_warnings(canonical, inner_layers, lambda node: node.name in in_torch))
    ctx.warnings.extend(unmatched_patterns(canonical, layers + recurrent + inner_layers, config))
    return dataclasses.replace(plan, warnings=tuple(ctx.warnings))


def run_pipeline(original: onnx.ModelProto, recon: CalibrationSet, held: CalibrationSet, config: Resolved,
                 progress: Progress):
    """Returns (quantized model, report dict, QuantParams). Each stage is given its part of ``config``."""
    import torch

    from onnxflex.rounding.reconstruct import reconstruct
    from onnxflex.rounding.torchify import QuantState

    timings = {}
    t = time.perf_counter()
    torch.manual_seed(config.rounding.seed)
    target = get_target(config.plan.target)
    device = resolve_device(config.capture.device)
    plan = build_plan(original, config.plan)
    check_custom_ops(plan.model)  # before any calibration work
    for warning in plan.warnings:
        log.warning(warning)
    fixed = fixed_batch(plan.model)
    if fixed and fixed != config.rounding.batch_size:
        log.info("the model's inputs fix the batch at %d; reconstruction uses batches of %d", fixed, fixed)
        config = config.replace(rounding=config.rounding.replace(batch_size=fixed))
    _check_batch(recon, held, config.rounding)
    check_free_disk(plan.model, sorted({n for b in plan.blocks for n in b.inputs + b.outputs}), recon,
                    config.capture.max_cache_mb)
    plan, config, sections = _adapt_plan(original, plan, recon, config, device.providers, progress, timings)
    checkpoint = None
    if config.rounding.checkpoint_dir:
        from onnxflex.checkpoint import Checkpoint, fingerprint

        # refuses a folder written for another run before any work starts
        checkpoint = Checkpoint(config.rounding.checkpoint_dir,
                                fingerprint(plan.model, config.to_dict(), (recon.arrays, held.arrays, _shared(recon))))
    timings["passes"] = _lap(t)

    t = time.perf_counter()
    cache = TensorCache(config.capture.max_cache_mb << 20)
    try:
        boundary = sorted({n for b in plan.blocks for n in b.inputs + b.outputs})
        progress.start(recon.num_samples, "capture")
        capture(plan.model, boundary, recon, cache, device.providers, progress=progress.update)
        layout = cache.layout
        progress.finish(f"captured {len(boundary)} tensors over {recon.num_samples} samples"
                        + (" (spilled to disk)" if cache.spilled else ""))
        timings["capture"] = _lap(t)
        t = time.perf_counter()
        reference = _fp_reference(original, held, device.providers, layout)
        reference_seconds = _lap(t)

        t = time.perf_counter()
        state = QuantState()
        results, modules = reconstruct(plan, cache, state, target, config.rounding, torch.device(device.torch_device),
                                       progress, device.providers, checkpoint)
        timings["reconstruct"] = _lap(t)
    finally:
        cache.close()

    t = time.perf_counter()
    params = state.export(target.act_dtype)
    qmodel = offload(emit(plan.model, params, target))  # a large model's new int8 weights go to disk too
    timings["emit"] = _lap(t)

    t = time.perf_counter()
    verification = None
    if held.num_samples:
        verification = _verification(qmodel, plan, modules, reference, held, config.verify,
                                     config.rounding.batch_size, device, layout)
    timings["verify"] = _lap(t) + reference_seconds

    layers_of = {b.name: len(b.layers) for b in plan.blocks}
    report = {
        "blocks": [dict(name=r.name, layers=layers_of[r.name], runtime=r.runtime, loss_before=r.loss_before,
                        loss_after=r.loss_after, iters=r.iters, seconds=r.seconds) for r in results],
        "plan": {"blocks": len(plan.blocks), "layers": len(plan.layers), "activation_points": len(plan.act_points),
                 "granularity": config.plan.granularity},
        "verification": verification.to_dict() if verification else {},
        **sections,
        "timings": timings,
        "_plan": plan,
        "_verification": verification,
    }
    return qmodel, report, params


def _verification(qmodel: onnx.ModelProto, plan: BlockPlan, modules: list, reference: dict, held: CalibrationSet,
                  config: VerifyOptions, batch_size: int, device, layout):
    """verify.verify on the held-out samples (simulated in batches of ``batch_size``); when onnxruntime
    and the simulation part, the blocks are compared one by one (divergence.locate) and the result names
    the first block where they do."""
    import torch

    from onnxflex.divergence import comparison_points, locate
    from onnxflex.rounding.reconstruct import simulate
    from onnxflex.verify import verify

    torch_device = torch.device(device.torch_device)
    at = comparison_points(plan.model)
    simulated = simulate(modules, plan, held, torch_device, batch_size,
                         layout.merged({t: layout.axis(o) for o, t in at.items()}), keep=tuple(at.values()))
    verification = verify(qmodel, reference, held, simulated, device.providers, config.verify_tolerance_db,
                          layout, at)
    if verification.failure() is None:
        return verification
    batch = fixed_batch(plan.model) or batch_size
    try:
        found = locate(qmodel, plan, modules, held, device.providers, batch, config.verify_tolerance_db,
                       torch_device)
    except Exception as exc:  # the failure must still reach the user with its model, unlocalized
        log.debug("the block-by-block comparison failed", exc_info=True)
        return dataclasses.replace(verification, divergence_summary=(
            f"the block-by-block comparison could not run ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"))
    verification = dataclasses.replace(verification, divergence=found.to_dict(), divergence_summary=found.summary(),
                                       blocks_agree=found.blocks_agree)
    if verification.chained_warning():
        log.warning(verification.chained_warning())
    return verification


def _adapt_plan(original: onnx.ModelProto, plan: BlockPlan, recon: CalibrationSet, config: Resolved,
                providers, progress: Progress, timings: dict) -> tuple[BlockPlan, Resolved, dict]:
    """The plan changes that need calibration data, in order: latency placement (keeps slower layers in
    float: a new plan and a config excluding them), LayerNorm folding (mutates ``plan.model``), mixed
    precision (per-layer bits). Returns (plan, config, their report sections); adds to ``timings``."""
    sections: dict = {"latency_placement": {}, "layernorm_folds": [], "mixed_precision": {}}
    if config.refine.optimize_latency:
        from onnxflex.latency import choose_float_layers

        t = time.perf_counter()
        choice = choose_float_layers(original, plan, recon, config.plan, config.rounding,
                                     config.refine.latency_threads, build_plan, progress)
        timings["latency_placement"] = _lap(t)
        sections["latency_placement"] = choice.to_dict()
        if choice.float_layers:
            config = config.replace(plan=config.plan.replace(exclude_nodes=config.plan.exclude_nodes
                                                             + choice.float_layers))
            plan = build_plan(original, config.plan)
    if config.refine.reparam_layernorm and plan.act_points:
        from onnxflex.passes.ln_reparam import reparam_layernorm

        sections["layernorm_folds"] = reparam_layernorm(plan.model, plan.act_points, recon, providers)
        if sections["layernorm_folds"]:
            log.info("folded per-channel ranges of %d LayerNorm outputs into their LayerNorms and readers",
                     len(sections["layernorm_folds"]))
    if config.budgets.active:
        from onnxflex.mixed import choose_bits

        t = time.perf_counter()
        plan, allocation = choose_bits(plan, recon, config.budgets, providers, progress)
        timings["mixed_precision"] = _lap(t)
        sections["mixed_precision"] = allocation.to_dict()
    return plan, config, sections


def _fp_reference(original: onnx.ModelProto, held: CalibrationSet, providers, layout) -> dict:
    """The FP32 model's outputs on the held-out samples, computed before any quantized weights exist, so
    that a large model's FP32 session never shares memory with them."""
    from onnxflex.verify import run

    if not held.num_samples:
        return {}
    reference = load_model(original)
    name_nodes_uniquely(reference)  # onnxruntime refuses repeated node names
    return run(reference, held, providers, layout=layout)


def _check_batch(recon: CalibrationSet, held: CalibrationSet, config: RoundingOptions) -> None:
    """Learned rounding trains on batches of ``batch_size``; fewer samples than one batch is an error."""
    if config.method == "rtn" or config.iters == 0 or recon.num_samples >= config.batch_size:
        return
    inputs = ", ".join(repr(n) for n in recon.arrays)
    raise CalibrationError(
        f"{recon.source}: input(s) {inputs} have {recon.num_samples + held.num_samples} samples, "
        f"{held.num_samples} of them held out for verification, which leaves {recon.num_samples} for batches "
        f"of {config.batch_size}: give at least {config.batch_size + held.num_samples} samples or lower --batch-size")


def _shared(data: CalibrationSet) -> dict:
    """The shared inputs as one-sample arrays, for the checkpoint fingerprint."""
    return {k: np.asarray(v)[None] for k, v in data.shared.items()}


def _lap(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


__all__ = ["build_plan", "run_pipeline"]
