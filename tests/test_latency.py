"""--optimize-latency (onnxflex/latency.py): measured placement keeps integer-slower layers in float.

The decision logic runs on scripted timings (a real machine's timings are noise in a test); one run
times the bundled CNN for real and checks the report and the emitted model, not the speed.
"""
from __future__ import annotations

import collections

import onnx
import pytest

import onnxflex
import onnxflex.latency as latency
from helpers import CNN
from onnxflex.calib import CalibrationSet
from onnxflex.config import QuantConfig
from onnxflex.errors import ConfigError
from onnxflex.options import resolve
from onnxflex.pipeline import build_plan
from onnxflex.runtimes.targets import get_target
from onnxflex.verify import optimized_op_counts

FAST = dict(method="rtn", optimize_latency=True, latency_threads=1, verify_samples=16)


def cnn_layers() -> list[str]:
    return [layer.node for layer in build_plan(onnx.load(str(CNN)), resolve(QuantConfig()).plan).layers]


def scripted(monkeypatch, *answers: list[float]) -> list[int]:
    """Replace the timer: each call gets the next list of per-model times, the same in every round;
    returns a list that records each call's number of models."""
    calls, pending = [], list(answers)

    def fake(models, feed, repeats, threads):
        calls.append(len(models))
        return [[t] * 3 for t in pending.pop(0)]

    monkeypatch.setattr(latency, "run_rounds", fake)
    return calls


def count_pass_runs(monkeypatch) -> list[int]:
    """Counts the runs of the graph passes (planning.run_passes) in its one element."""
    import onnxflex.planning as planning

    count, run = [0], planning.run_passes

    def counted(*args, **kwargs):
        count[0] += 1
        return run(*args, **kwargs)

    monkeypatch.setattr(planning, "run_passes", counted)
    return count


def test_slower_integer_layers_are_kept_in_float(monkeypatch):
    names = cnn_layers()
    slow = {names[0], names[-1]}
    # FP32 2.0 ms, all integer 1.0 ms; keeping a slow layer float saves 0.1 ms, any other costs 0.1 ms
    per_layer = [0.9 if n in slow else 1.1 for n in names]
    calls = scripted(monkeypatch, [2.0, 1.0] + per_layer, [1.0, 0.8])
    passes = count_pass_runs(monkeypatch)
    result = onnxflex.quantize(CNN, config=QuantConfig(**FAST), progress=False)
    placement = result.report["latency_placement"]
    assert calls == [len(names) + 2, 2], calls
    assert passes == [1], f"the graph passes ran {passes} times; each variant re-places the canonical model"
    assert result.report["config"]["exclude_nodes"] == [n for n in names if n in slow], "the config as it ran"
    assert set(placement["float_layers"]) == slow, placement
    assert placement["chosen_ms"] == 0.8 and placement["predicted_ratio_vs_fp32"] == 0.4, placement
    assert [r["layer"] for r in placement["layers"] if r["kept_float"]] == [n for n in names if n in slow]
    quantized = {r["node"] for r in result.report["layers"]}
    assert not quantized & slow and len(quantized) == len(names) - 2, quantized
    float_weights = {t.name for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    slow_weights = {n.input[1] for n in result.model.graph.node if n.name in slow}
    assert len(slow_weights) == 2 and slow_weights <= float_weights, slow_weights


def test_losers_stay_integer_when_floating_them_together_is_not_faster(monkeypatch):
    names = cnn_layers()
    scripted(monkeypatch, [2.0, 1.0] + [0.9] + [1.1] * (len(names) - 1), [1.0, 1.05])
    result = onnxflex.quantize(CNN, config=QuantConfig(**FAST), progress=False)
    placement = result.report["latency_placement"]
    assert placement["float_layers"] == [] and placement["chosen_ms"] == 1.0, placement
    assert not any(r["kept_float"] for r in placement["layers"])
    assert len(result.report["layers"]) == len(names)


def test_savings_within_the_margin_change_nothing(monkeypatch):
    names = cnn_layers()
    calls = scripted(monkeypatch, [2.0, 1.0] + [1.0 - latency.MARGIN / 2] * len(names))
    result = onnxflex.quantize(CNN, config=QuantConfig(**FAST), progress=False)
    assert calls == [len(names) + 2], "no second timing round without losers"
    assert result.report["latency_placement"]["float_layers"] == []


def test_synthetic_models_fuse_like_the_emitted_one():
    """The timed variants must be the structure onnxflex emits: same fused integer kernels."""
    import numpy as np

    model = onnx.load(str(CNN))
    config = QuantConfig(method="rtn")
    plan = build_plan(model, resolve(config).plan)
    with np.load(CNN.with_suffix(".calib.npz")) as data:
        sample = CalibrationSet({"input": data["input"][:32]}, "test")
    synthetic = latency._emitted(plan, get_target("onnxruntime"), resolve(config).rounding, sample)
    real = onnxflex.quantize(CNN, config=config, progress=False).model
    assert optimized_op_counts(synthetic) == optimized_op_counts(real)
    assert optimized_op_counts(real).get("QLinearConv") == 6  # the stem and the 1x1 skip stay float (latency rule)


def test_real_timing_on_the_cnn_gives_a_consistent_report():
    result = onnxflex.quantize(CNN, config=QuantConfig(**FAST), progress=False)
    placement = result.report["latency_placement"]
    names = cnn_layers()
    assert [r["layer"] for r in placement["layers"]] == names
    assert placement["batch"] == 32 and placement["threads"] == 1
    assert min(placement["fp32_ms"], placement["all_int8_ms"], placement["chosen_ms"]) > 0
    assert placement["chosen_ms"] <= placement["all_int8_ms"], placement
    kept = set(placement["float_layers"])
    assert {r["node"] for r in result.report["layers"]} == set(names) - kept
    ops = collections.Counter(n.op_type for n in result.model.graph.node)
    assert ops["QuantizeLinear"] > 0
    assert result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["logits"] >= 35.0
    print(f"\nCNN latency placement: {placement['fp32_ms']:.3f} ms FP32, {placement['all_int8_ms']:.3f} ms all "
          f"integer, {placement['chosen_ms']:.3f} ms chosen; float: {sorted(kept) or 'none'}")


def test_when_every_layer_loses_all_stay_integer(monkeypatch):
    names = cnn_layers()
    calls = scripted(monkeypatch, [2.0, 1.0] + [0.5] * len(names))
    result = onnxflex.quantize(CNN, config=QuantConfig(**FAST), progress=False)
    assert calls == [len(names) + 2], "no trial of an all-float model"
    assert result.report["latency_placement"]["float_layers"] == []
    assert len(result.report["layers"]) == len(names)


def test_bad_latency_threads_is_a_config_error():
    with pytest.raises(ConfigError, match="latency_threads"):
        QuantConfig(latency_threads=-1)


def test_latency_placement_on_a_model_with_a_shared_0d_input(monkeypatch):
    """The streaming VAD has a 0-d ``sr`` input shared by every sample and its state batched on axis 1:
    the timed batch and the synthetic ranges are fed in the model's layout (this was an IndexError)."""
    from zoo_models import zoo_models

    zoo = next(m for m in zoo_models() if m.name == "vad_stream_gru")
    monkeypatch.setattr(latency, "REPEATS", 3)
    config = QuantConfig(**FAST, fix_inputs=tuple(f"{k}={v}" for k, v in zoo.fix_inputs.items()))
    result = onnxflex.quantize(onnx.load(zoo.path), zoo.feeds(32), config, progress=False)
    placement = result.report["latency_placement"]
    assert placement["batch"] >= 1 and len(placement["layers"]) == 4, placement  # 3 Conv + Gemm
