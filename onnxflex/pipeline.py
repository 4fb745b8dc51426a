"""The quantize pipeline, stage by stage: passes → plan → capture → reconstruct → emit → verify."""
from __future__ import annotations

import logging
import time

import onnx

from onnxflex.blocks import BlockPlan
from onnxflex.calib import CalibrationSet, fixed_batch
from onnxflex.capture import TensorCache, capture
from onnxflex.config import QuantConfig
from onnxflex.device import resolve_device
from onnxflex.emit import emit
from onnxflex.graph import load_model, name_nodes_uniquely
from onnxflex.passes.partition import partition
from onnxflex.passes.pipeline import PassContext, run_passes
from onnxflex.passes.select import activation_points, select_layers
from onnxflex.progress import Progress
from onnxflex.runtimes.base import get_target

log = logging.getLogger("onnxflex")


def build_plan(model: onnx.ModelProto, config: QuantConfig) -> BlockPlan:
    """Run the graph passes and partition the result into blocks (no data needed)."""
    from onnxflex.rounding.converters import find_converter

    target = get_target(config.target)
    ctx = PassContext(config)
    canonical = run_passes(load_model(model), ctx)  # a copy: passes may mutate their input
    layers = select_layers(canonical, target, config)
    points = activation_points(canonical, layers, target, config)

    def supported(op_type: str, opset: int, domain: str) -> bool:
        return find_converter(op_type, opset, domain) is not None

    return partition(canonical, layers, points, config.granularity, supported, tuple(ctx.warnings))


def run_pipeline(original: onnx.ModelProto, recon: CalibrationSet, held: CalibrationSet, config: QuantConfig,
                 progress: Progress):
    """Returns (quantized model, report dict, QuantParams)."""
    import torch

    from onnxflex.rounding.reconstruct import reconstruct, simulate
    from onnxflex.rounding.torchify import QuantState
    from onnxflex.verify import verify

    timings = {}
    t = time.perf_counter()
    torch.manual_seed(config.seed)
    target = get_target(config.target)
    device = resolve_device(config.device)
    plan = build_plan(original, config)
    for warning in plan.warnings:
        log.warning(warning)
    fixed = fixed_batch(plan.model)
    if fixed and fixed != config.batch_size:
        log.info("the model's inputs fix the batch at %d; reconstruction uses batches of %d", fixed, fixed)
        config = config.replace(batch_size=fixed)
    timings["passes"] = _lap(t)

    t = time.perf_counter()
    cache = TensorCache(config.max_cache_mb << 20)
    try:
        boundary = sorted({n for b in plan.blocks for n in b.inputs + b.outputs})
        progress.start(recon.num_samples, "capture")
        capture(plan.model, boundary, recon, cache, device.providers, progress=progress.update)
        progress.finish(f"captured {len(boundary)} tensors over {recon.num_samples} samples"
                        + (" (spilled to disk)" if cache.spilled else ""))
        timings["capture"] = _lap(t)

        t = time.perf_counter()
        state = QuantState()
        results, modules = reconstruct(plan, cache, state, target, config, torch.device(device.torch_device),
                                       progress, device.providers)
        timings["reconstruct"] = _lap(t)
    finally:
        cache.close()

    t = time.perf_counter()
    params = state.export(target.act_dtype)
    qmodel = emit(plan.model, params, target)
    timings["emit"] = _lap(t)

    t = time.perf_counter()
    verification = None
    if held.num_samples:
        simulated = simulate(modules, plan, held.arrays, torch.device(device.torch_device), config.batch_size)
        reference = load_model(original)
        name_nodes_uniquely(reference)  # onnxruntime refuses repeated node names
        verification = verify(qmodel, reference, held.arrays, simulated, device.providers,
                              config.verify_tolerance_db)
    timings["verify"] = _lap(t)

    layers_of = {b.name: len(b.layers) for b in plan.blocks}
    report = {
        "blocks": [dict(name=r.name, layers=layers_of[r.name], runtime=r.runtime, loss_before=r.loss_before,
                        loss_after=r.loss_after, iters=r.iters, seconds=r.seconds) for r in results],
        "plan": {"blocks": len(plan.blocks), "layers": len(plan.layers), "activation_points": len(plan.act_points),
                 "granularity": config.granularity},
        "verification": verification.to_dict() if verification else {},
        "warnings": list(plan.warnings),
        "timings": timings,
        "_plan": plan,
    }
    return qmodel, report, params


def _lap(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


__all__ = ["build_plan", "run_pipeline"]
