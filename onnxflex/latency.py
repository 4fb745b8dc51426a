"""Latency-aware placement (``--optimize-latency``): keep in float the layers that run slower as integers.

On CPUs an integer layer is not always faster than its float version: Q/DQ at its boundaries, small or
depthwise convolutions and unfused neighbours can cost more than the integer kernel saves. Which layers
lose depends on the machine and the onnxruntime build, so they are measured, not guessed:

1. The plan is emitted once with every layer quantized (model A) and once per layer with only that
   layer kept in float (model A−l), all with round-to-nearest weights and min/max activation
   parameters from one batch: timing depends on the structure and the zero points (which decide
   whether onnxruntime fuses an activation), not on learned values, so no reconstruction is needed.
2. All models are timed in onnxruntime on one calibration batch, runs interleaved so that load on the
   machine affects them alike (median of ``repeats``). A layer whose A−l is faster than A by more
   than ``margin`` of A's time is a loser.
3. The model with every loser in float (B) is timed against A; the losers stay in float only when B
   is faster, so the result is never slower than the plain placement (up to timing noise).

The cost is one emit and one session per layer (the graph passes run once: each variant re-selects and
re-partitions the canonical model), so it suits models with tens of layers, not thousands.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxflex.blocks import BlockPlan
from onnxflex.calib import CalibrationSet
from onnxflex.graph import load_model, name_nodes_uniquely
from onnxflex.options import PlanOptions, RoundingOptions
from onnxflex.planning import place
from onnxflex.qparams import QuantParams

log = logging.getLogger("onnxflex")

MARGIN = 0.02  # a layer loses when keeping it in float saves more than this fraction of the model's time
REPEATS = 21


@dataclass
class LatencyChoice:
    """What the measurement decided: layers kept in float and the timings behind it (milliseconds)."""

    float_layers: tuple[str, ...]
    fp32_ms: float
    int8_ms: float
    chosen_ms: float
    batch: int
    threads: int
    layers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"float_layers": list(self.float_layers), "fp32_ms": self.fp32_ms, "all_int8_ms": self.int8_ms,
                "chosen_ms": self.chosen_ms, "predicted_ratio_vs_fp32": round(self.chosen_ms / self.fp32_ms, 3),
                "batch": self.batch, "threads": self.threads, "layers": self.layers}

    def describe(self) -> str:
        kept = ", ".join(self.float_layers) or "none"
        return (f"latency placement (batch {self.batch}): FP32 {self.fp32_ms:.3f} ms, all integer "
                f"{self.int8_ms:.3f} ms, chosen {self.chosen_ms:.3f} ms; kept in float: {kept}")


def synthetic_params(plan: BlockPlan, target, config: RoundingOptions, sample: CalibrationSet) -> QuantParams:
    """The parameters a round-to-nearest run would export for ``plan`` (the same quantizers, ties and
    int32 biases as reconstruction sets up), weights on min/max steps and activations on the min/max
    of ``sample`` (the timed batch, shared inputs included): the emitted model's exact structure and zero points, for timing. Zero points matter,
    because onnxruntime drops a Relu into the integer kernel only where the zero point makes it redundant.
    Activation points inside control-flow subgraphs are left float here (only their weights are int8)."""
    import torch

    from onnxflex.probes import channel_ranges
    from onnxflex.rounding.reconstruct import add_block_quantizers
    from onnxflex.rounding.torchify import QuantState

    state, cpu = QuantState(), torch.device("cpu")
    for block in plan.blocks:
        add_block_quantizers(block, plan.model, state, target, config.replace(weight_scale="minmax"), "rtn", cpu)
    inner = {p.tensor for b in plan.blocks for p in b.inner_points}
    for name in inner:  # not probed here: inside subgraphs they stay float in the timed variants
        state.acts[name].enabled = False
    ranges = channel_ranges(plan.model, [p for p in state.acts if p not in inner],
                            sample, ["CPUExecutionProvider"])
    tied: dict[int, list[str]] = {}  # points sharing one quantizer take their joint range
    for name, quantizer in state.acts.items():
        if name not in inner:
            tied.setdefault(id(quantizer), []).append(name)
    for names in tied.values():
        lo = min(float(ranges[n][0].min()) for n in names)
        hi = max(float(ranges[n][1].max()) for n in names)
        state.acts[names[0]].calibrate(lo, hi, None, "minmax")
    return state.export(target.act_dtype)


def run_rounds(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], repeats: int, threads: int
               ) -> list[list[float]]:
    """Milliseconds of one run over ``feed``, per model and round (``[model][round]``), after
    ort.WARMUP runs. Every round runs each model once, in an order shuffled per round (fixed seed), so
    that load on the machine affects them alike and no model always runs right after another (it
    would inherit that one's cache state)."""
    import time

    from onnxflex.ort import timing_sessions

    sessions = timing_sessions(models, feed, threads)
    times: list[list[float]] = [[] for _ in sessions]
    order = np.random.default_rng(0)
    for _ in range(repeats):
        for k in order.permutation(len(sessions)):
            t = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append((time.perf_counter() - t) * 1e3)
    return times


def latencies(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], repeats: int, threads: int
              ) -> list[float]:
    """Median milliseconds of one run per model (run_rounds)."""
    return [float(np.median(t)) for t in run_rounds(models, feed, repeats, threads)]


def _emitted(plan: BlockPlan, target, config: RoundingOptions, sample: CalibrationSet) -> onnx.ModelProto:
    from onnxflex.emit import emit

    return emit(plan.model, synthetic_params(plan, target, config, sample), target)


def _without(plan: BlockPlan, options: PlanOptions, nodes: tuple[str, ...]) -> BlockPlan:
    """A timing variant: ``plan.model`` re-placed with ``nodes`` kept in float (its warnings unused)."""
    return place(plan.model, options.replace(exclude_nodes=options.exclude_nodes + nodes))


def choose_float_layers(original: onnx.ModelProto, plan: BlockPlan, data: CalibrationSet, options: PlanOptions,
                        config: RoundingOptions, threads: int, progress) -> LatencyChoice:
    """Measures as the module docstring says and returns the layers to keep in float. ``plan`` is the
    plan stage's (of the canonical model, placed with ``options``): each variant re-places that model,
    the passes do not rerun. ``config`` sets up its quantizers and the timed batch; ``threads``:
    onnxruntime's."""
    from onnxflex.runtimes.targets import get_target

    target = get_target(options.target)
    batch = min(config.batch_size, data.num_samples)
    sample = data.take(0, batch)
    feed = sample.feeds()
    names = list(dict.fromkeys(layer.node for layer in plan.layers))  # an LSTM is two layers of one node
    progress.start(len(names) + 1, "latency: emitting variants")
    fp32 = load_model(original)  # FP32 as the user has it, node names made unique for onnxruntime
    name_nodes_uniquely(fp32)
    variants = [fp32, _emitted(plan, target, config, sample)]
    for k, name in enumerate(names):
        variants.append(_emitted(_without(plan, options, (name,)), target, config, sample))
        progress.update(k + 1)
    progress.finish(f"latency: timing {len(variants)} variants of the model on a batch of {batch}")
    rounds = run_rounds(variants, feed, REPEATS, threads)
    fp32, int8 = float(np.median(rounds[0])), float(np.median(rounds[1]))
    rows, losers = [], []
    for name, times in zip(names, rounds[2:]):
        # paired by round: load that slows one round slows both runs of the difference alike
        saves = float(np.median(np.subtract(rounds[1], times)))
        loses = saves > MARGIN * int8
        rows.append({"layer": name, "without_layer_ms": round(float(np.median(times)), 4),
                     "float_saves_ms": round(saves, 4), "kept_float": loses})
        if loses:
            losers.append(name)
    if losers and len(losers) == len(names):
        log.warning("every layer timed faster in float than as an integer on this machine (batch %d); an "
                    "all-float model is no quantized model, so all stay integer — compare the result's "
                    "latency with `onnxflex compare` before deploying it", batch)
        losers = []
        for row in rows:
            row["kept_float"] = False
    chosen = int8
    if losers:
        trial = _without(plan, options, tuple(losers))
        int8, chosen = latencies([variants[1], _emitted(trial, target, config, sample)], feed, REPEATS, threads)
        if chosen >= int8:
            log.info("keeping %d slower layers in float did not speed the model up (%.3f vs %.3f ms); "
                     "all stay integer", len(losers), chosen, int8)
            losers, chosen = [], int8
            for row in rows:
                row["kept_float"] = False
    choice = LatencyChoice(tuple(losers), round(fp32, 4), round(int8, 4), round(chosen, 4), batch,
                           threads, rows)
    log.info("%s", choice.describe())
    return choice
