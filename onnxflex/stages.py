"""The data stages after the plan, each a function returning a frozen record: hold out the
verification samples, capture (FP32 tensors into the cache, FP32 reference outputs), the step
budget (steps per block), reconstruct (the block loop), emit (the QDQ model) and verify
(onnxruntime against the simulation and FP32).
onnxflex/pipeline.py calls them in order."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxflex.calib import CalibrationSet, fixed_batch
from onnxflex.cache import TensorCache
from onnxflex.capture import capture, capture_batch
from onnxflex.device import Device
from onnxflex.emit import emit
from onnxflex.errors import CalibrationError
from onnxflex.extdata import dims_bytes, offload
from onnxflex.graph import load_model, name_nodes_uniquely
from onnxflex.layout import Layout
from onnxflex.options import DataOptions, Resolved, RoundingOptions
from onnxflex.passes.custom_ops import check_custom_ops
from onnxflex.planning import Planned
from onnxflex.progress import Progress
from onnxflex.qparams import QuantParams
from onnxflex.refiners import Refined
from onnxflex.rounding.heap import trim_freed
from onnxflex.runtimes.targets import get_target
from onnxflex.speed import latency_section, measured_ratio
from onnxflex.spill import MIB, check_free_disk, tensor_bytes

log = logging.getLogger("onnxflex")


@dataclass(frozen=True)
class Samples:
    """The calibration set split: ``recon`` for reconstruction, ``held`` (the last samples) for
    verification; ``total`` samples were given, from ``source``."""

    source: str
    total: int
    recon: CalibrationSet
    held: CalibrationSet


def admit(planned: Planned, config: Resolved) -> None:
    """Before any calibration work: refuse custom ops onnxruntime cannot run, show the plan's warnings
    and say when the model's fixed batch replaces ``config``'s batch size (the caller's)."""
    check_custom_ops(planned.plan.model)
    for warning in planned.plan.warnings:
        log.warning(warning)
    batch = planned.config.rounding.batch_size
    if batch != config.rounding.batch_size:
        log.info("the model's inputs fix the batch at %d; reconstruction uses batches of %d", batch, batch)


def hold_out(data: CalibrationSet, planned: Planned) -> Samples:
    """Splits ``data`` (whole batches of the model's fixed batch, where it has one) and checks that the
    reconstruction samples fill a batch and that the capture's spill fits on disk."""
    config = planned.config
    recon, held = split_calibration(data, config.data, planned.fixed_batch)
    _check_batch(recon, held, config.rounding)
    plan = planned.plan
    check_free_disk(plan.model, boundary_tensors(plan), recon, config.capture.max_cache_mb)
    return Samples(data.source, data.num_samples, recon, held)


def split_calibration(data: CalibrationSet, config: DataOptions, batch: int | None):
    """(reconstruction set, verification set): the last ``verify_samples`` are held out."""
    n = data.num_samples if not config.calib_samples else min(config.calib_samples, data.num_samples)
    held = min(config.verify_samples, n // 4)
    used = n - held
    if batch:
        used, held = used - used % batch, held - held % batch
    if used < 1:
        raise CalibrationError(f"{data.source}: {n} calibration samples are too few; give at least "
                               f"{max(2, batch or 1) * 2} samples")
    return data.take(0, used), data.take(used, used + held)


def _check_batch(recon: CalibrationSet, held: CalibrationSet, config: RoundingOptions) -> None:
    """Learned rounding trains on batches of ``batch_size``; fewer samples than one batch is an error."""
    from onnxflex.rounding.methods import reconstructs

    if not reconstructs(config.method) or config.iters == 0 or recon.num_samples >= config.batch_size:
        return
    inputs = ", ".join(repr(n) for n in recon.arrays)
    raise CalibrationError(
        f"{recon.source}: input(s) {inputs} have {recon.num_samples + held.num_samples} samples, "
        f"{held.num_samples} of them held out for verification, which leaves {recon.num_samples} for batches "
        f"of {config.batch_size}: give at least {config.batch_size + held.num_samples} samples or lower --batch-size")


def boundary_tensors(plan) -> list[str]:
    """Every block input and output: the tensors capture stores."""
    return sorted({n for b in plan.blocks for n in b.inputs + b.outputs})


def open_checkpoint(refined: Refined, samples: Samples):
    """The run's Checkpoint (config.checkpoint_dir), or None; refuses a folder written for another run
    before any work starts."""
    config = refined.config
    if not config.rounding.checkpoint_dir:
        return None
    from onnxflex.checkpoint import Checkpoint, fingerprint

    shared = {k: np.asarray(v)[None] for k, v in samples.recon.shared.items()}  # one-sample arrays
    return Checkpoint(config.rounding.checkpoint_dir, fingerprint(refined.plan.model, config.to_dict(),
                                                         (samples.recon.arrays, samples.held.arrays, shared)))


@dataclass(frozen=True)
class Captured:
    """The capture stage's record: the layout (batch axis per tensor) of the captured tensors, now in
    the cache, the FP32 model's outputs on the held-out samples (empty without any), and the act
    points' observations of the capture run (rounding/actcapture.CaptureObservers, or None)."""

    layout: Layout
    reference: dict[str, np.ndarray]
    seconds: float
    reference_seconds: float
    observers: Any = None


def capture_fp32(original: onnx.ModelProto, refined: Refined, samples: Samples, cache: TensorCache,
                 device: Device, progress: Progress, learners: set[int] | None = None) -> Captured:
    """Runs the refined plan's model over the reconstruction samples with every block boundary probed
    (into ``cache``, which this mutates; of each tensor the rows some block reads, ``learners`` the
    blocks that learn: ``learners_of``, None: any may), the act points of the blocks it can observe
    probed too (their ranges: rounding/actcapture.py), then the FP32 model over the held-out ones."""
    t = time.perf_counter()
    boundary = boundary_tensors(refined.plan)
    recon = samples.recon
    progress.start(recon.num_samples, "capture")
    observers = act_observers(refined, recon)
    probed = boundary + (observers.tensors if observers is not None else [])
    sizes = tensor_bytes(refined.plan.model, list(dict.fromkeys(probed)), recon)
    # a run's act points stay with the observers while the next run's outputs come back (capture.capture)
    held = sum(sizes.get(name, 0) for name in observers.tensors) if observers is not None else 0
    per_sample = sum(sizes.values()) + held
    batch = capture_batch(per_sample, refined.config.capture.max_cache_mb * MIB)
    if observers is not None:
        observers = act_observers(refined, recon, batch)
    capture(refined.plan.model, boundary, recon, cache, device.providers, batch=batch, progress=progress.update,
            observers=observers, rows=stored_rows(refined, recon, observers, learners))
    layout = cache.layout
    progress.finish(f"captured {len(boundary)} tensors over {recon.num_samples} samples"
                    + (" (spilled to disk)" if cache.spilled else ""))
    seconds = _lap(t)
    t = time.perf_counter()
    reference = fp_reference(original, samples.held, device.providers, layout)
    return Captured(layout, reference, seconds, _lap(t), observers)


def stored_rows(refined: Refined, recon: CalibrationSet, observers, learners: set[int] | None) -> dict[str, int]:
    """rounding/actcapture.stored_rows for this run: fewer FP rows of what only blocks that do not learn
    read."""
    from onnxflex.rounding.actcapture import stored_rows

    rounding = refined.config.rounding
    return stored_rows(refined.plan, observers, recon.num_samples, learners, fixed_batch(refined.plan.model),
                       rounding.block_input == "fp")


def learners_of(refined: Refined, budget) -> set[int]:
    """The blocks that learn under ``budget`` (budget.StepBudget; None: every block ``config.iters``):
    reconstruct.learning_blocks."""
    from onnxflex.rounding.reconstruct import learning_blocks

    return set(learning_blocks(refined.plan, refined.config.rounding, budget))


def budget_before_capture(refined: Refined, samples: Samples) -> bool:
    """Whether the step budget can be planned before capture: the method learns nothing (no budget), or
    no layer's shape needs captured tensors (budget.needs_captured_shapes). Capture then knows which
    blocks learn and stores fewer rows of what only the others read."""
    from onnxflex.budget import needs_captured_shapes
    from onnxflex.rounding.methods import reconstructs

    return not reconstructs(refined.config.rounding.method) or not needs_captured_shapes(refined.plan, samples.recon)


def act_observers(refined: Refined, recon: CalibrationSet, batch: int = 1):
    """The capture run's act point observers (rounding/actcapture.CaptureObservers) for runs of
    ``batch`` samples (the model's fixed batch where it has one), or None: activations stay float, or
    the MSE search draws its samples from the torch run."""
    if not refined.config.rounding.abits or refined.config.rounding.act_scale == "mse":
        return None
    from onnxflex.rounding.actcapture import CaptureObservers

    size = fixed_batch(refined.plan.model) or batch
    target = get_target(refined.config.plan.target)
    return CaptureObservers(refined.plan, target.shared_concat_scales, -(-recon.num_samples // size))


def fp_reference(original: onnx.ModelProto, held: CalibrationSet, providers, layout) -> dict:
    """The FP32 model's outputs on the held-out samples, computed before any quantized weights exist, so
    that a large model's FP32 session never shares memory with them."""
    from onnxflex.verify import run

    if not held.num_samples:
        return {}
    reference = load_model(original)
    name_nodes_uniquely(reference)  # onnxruntime refuses repeated node names
    return run(reference, held, providers, layout=layout)


def step_budget(refined: Refined, samples: Samples, device: Device, cache: TensorCache | None = None):
    """The run's budget.StepBudget (steps per block from step_budget, time_budget or the preset's
    step_cap), or None when all are off, the full schedule fits the cap, or the method learns nothing;
    ``cache`` (captured) gives the shapes of tensors that
    shape inference leaves unknown."""
    from onnxflex.budget import plan_budget

    return plan_budget(refined.plan, samples.recon, refined.config.rounding, device.torch_device, cache)


@dataclass(frozen=True)
class Reconstructed:
    """The block loop's record: per-block results (rounding/reconstruct.BlockResult), the frozen block
    modules (for simulation), the exported parameters the emitter writes and the step budget the
    blocks ran under (budget.StepBudget, or None)."""

    results: tuple[Any, ...]
    modules: tuple[Any, ...]
    params: QuantParams
    seconds: float
    budget: Any = None


def reconstruct_blocks(refined: Refined, cache: TensorCache, checkpoint, device: Device,
                       progress: Progress, budget=None, observers=None) -> Reconstructed:
    """rounding/reconstruct.reconstruct over the refined plan, reading (and adding to) ``cache``, each
    block's steps from ``budget`` (budget.StepBudget; None: the config's iterations), the act ranges
    of the blocks ``observers`` (Captured.observers) holds from the capture run; with block_input fp
    each block is a job, in this process or in workers (onnxflex/workers.py)."""
    import torch

    from onnxflex.rounding.reconstruct import reconstruct
    from onnxflex.rounding.torchify import QuantState
    from onnxflex.workers import spread

    t = time.perf_counter()
    target = get_target(refined.config.plan.target)
    state = QuantState()
    results, modules = reconstruct(refined.plan, cache, state, target, refined.config.rounding,
                                   torch.device(device.torch_device), progress, device.providers, checkpoint, budget,
                                   observers, spread)
    seconds = _lap(t)
    return Reconstructed(tuple(results), tuple(modules), state.export(target.act_dtype), seconds, budget)


@dataclass(frozen=True)
class Emitted:
    """The emit stage's record: the QDQ model as it is written."""

    model: onnx.ModelProto
    seconds: float


def emit_model(refined: Refined, reconstructed: Reconstructed) -> Emitted:
    """The QDQ model of the refined plan with the exported parameters (a large model's new integer
    weights go to disk too)."""
    t = time.perf_counter()
    model = offload(emit(refined.plan.model, reconstructed.params, get_target(refined.config.plan.target)))
    trim_freed()  # the stages' intermediate models: a 1.41 GiB decoder's emission left 970 MiB of free heap
    return Emitted(model, _lap(t))


@dataclass(frozen=True)
class Verified:
    """The verify stage's record: verify.Verification, or None when no sample was held out, and the
    report's ``latency_rules`` section (speed.latency_section: predicted and measured ratio vs FP32)."""

    verification: Any
    seconds: float
    latency: dict = dataclasses.field(default_factory=dict)


def verify_model(emitted: Emitted, refined: Refined, reconstructed: Reconstructed, captured: Captured,
                 samples: Samples, device: Device, original: onnx.ModelProto | None = None) -> Verified:
    """Runs the emitted model against the simulation and FP32 on the held-out samples; without any,
    warns that the output is unverified. Then times it against ``original`` (the user's FP32 model;
    None: not timed) for the latency_rules section, which changes nothing emitted."""
    t = time.perf_counter()
    verification = None
    if not samples.held.num_samples:
        _warn_unverified(samples.total, refined.config.data)
    else:
        verification = _verification(emitted.model, refined, reconstructed.modules, captured, samples.held, device)
    latency = latency_rules(emitted.model, refined, samples, original)
    return Verified(verification, _lap(t) + captured.reference_seconds, latency)


def latency_rules(qmodel: onnx.ModelProto, refined: Refined, samples: Samples,
                  original: onnx.ModelProto | None) -> dict:
    """The latency_rules section (onnxflex/speed.py): the cost model on the shapes of one batch (held
    out, else of reconstruction), the ratio measured on one held-out batch when there is one. A
    measurement that cannot run is noted in the section, never raised: it decides nothing."""
    config, plan = refined.config, refined.plan
    data = samples.held if samples.held.num_samples else samples.recon
    batch = fixed_batch(plan.model) or min(config.rounding.batch_size, data.num_samples)
    feed = data.feeds(0, batch) if 0 < batch <= data.num_samples else {}
    if original is None:
        skipped = "no FP32 model to time against"
    elif not samples.held.num_samples:
        skipped = "no held-out samples"
    elif not feed:
        skipped = f"fewer held-out samples than the model's batch {batch}"
    elif (weights := float_weight_bytes(original)) > config.capture.max_cache_mb * MIB:
        skipped = (f"the FP32 model's {weights / MIB:.0f} MiB of weights exceed the memory bound --max-cache-mb "
                   f"{config.capture.max_cache_mb}: its timing session would hold them all")
    else:
        skipped = ""
    timed = {"measured_ratio_vs_fp32": None, "measured": {"skipped": skipped}}
    if not skipped:
        try:
            timed = measured_ratio(original, qmodel, feed, config.refine.latency_threads)
        except Exception as exc:  # onnxruntime raises several unrelated types; the section only reports
            log.debug("timing the emitted model failed", exc_info=True)
            timed["measured"]["skipped"] = f"onnxruntime could not time it: {type(exc).__name__}: {exc}"[:300]
    return latency_section(plan, get_target(config.plan.target), config.plan.latency_rules, feed, timed)


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def float_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's top-level float initializers, inline or external (extdata.dims_bytes)."""
    return sum(dims_bytes(t) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)


def _verification(qmodel: onnx.ModelProto, refined: Refined, modules, captured: Captured, held: CalibrationSet,
                  device: Device):
    """verify.verify on the held-out samples; when onnxruntime and the simulation part, the blocks are
    compared one by one (divergence.locate) and the result names the first block where they do."""
    import torch

    from onnxflex.divergence import comparison_points
    from onnxflex.rounding.reconstruct import simulate
    from onnxflex.verify import verify

    plan, config, layout = refined.plan, refined.config, captured.layout
    at = comparison_points(plan.model)
    simulated = simulate(list(modules), plan, held, torch.device(device.torch_device), config.rounding.batch_size,
                         layout.merged({t: layout.axis(o) for o, t in at.items()}), keep=tuple(at.values()))
    verification = verify(qmodel, captured.reference, held, simulated, device.providers,
                          config.verify.verify_tolerance_db, layout, at)
    if verification.failure() is None:
        return verification
    return _located(verification, qmodel, refined, modules, held, device)


def _located(verification, qmodel: onnx.ModelProto, refined: Refined, modules, held: CalibrationSet,
             device: Device):
    """``verification`` with the first block where onnxruntime and the simulation part."""
    import torch

    from onnxflex.divergence import locate

    config = refined.config
    try:
        found = locate(qmodel, refined.plan, list(modules), held, device.providers, config.rounding.batch_size,
                       config.verify.verify_tolerance_db, torch.device(device.torch_device))
    except Exception as exc:  # the failure must still reach the user with its model, unlocalized
        log.debug("the block-by-block comparison failed", exc_info=True)
        return dataclasses.replace(verification, divergence_summary=(
            f"the block-by-block comparison could not run ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"))
    verification = dataclasses.replace(verification, divergence=found.to_dict(), divergence_summary=found.summary(),
                                       blocks_agree=found.blocks_agree)
    if verification.chained_warning():
        log.warning(verification.chained_warning())
    return verification


def _warn_unverified(samples: int, config: DataOptions) -> None:
    """No sample was held out, so the emitted model was never run against FP32: say so (on stderr, and
    so in the report's warnings)."""
    message = (f"the output is UNVERIFIED: {samples} calibration samples leave none held out for verification "
               f"(verify_samples={config.verify_samples}, at most a quarter of the samples); give at least 4 "
               "samples with --verify-samples 1 or more to have it checked against FP32")
    log.warning(message)


def _lap(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


__all__ = ["Captured", "Emitted", "Reconstructed", "Samples", "Verified", "admit", "budget_before_capture",
           "capture_fp32", "emit_model", "hold_out", "learners_of", "open_checkpoint", "reconstruct_blocks",
           "split_calibration",
           "step_budget", "verify_model"]
