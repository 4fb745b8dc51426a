"""The step budget (onnxflex/budget.py): FLOPs from shapes, the split of a budget over blocks, the
fast preset's budget end to end, the options that set it, and a budget that is off or covers every
block changing nothing."""
from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from helpers import CNN, run_model
from onnxflex.blocks import QuantLayer
from onnxflex.budget import (ACT_STEP_FLOPS, FWD_BWD, MIN_STEPS, STEP_FIXED_FLOPS, WEIGHT_STEP_FLOPS, BlockCost, block_costs,
                             full_schedule_flops, layer_flops, measure_rate, plan_budget, split, step_cost)
from onnxflex.calib import CalibrationSet
from onnxflex.cli import main
from onnxflex.config import QuantConfig
from onnxflex.errors import ConfigError
from onnxflex.options import DEFAULT_STEP_CAP, FAST_STEP_BUDGET, resolve
from onnxflex.planning import build_plan


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _three_layer_model(batch) -> onnx.ModelProto:
    """x[batch, 3, 8, 8] → Conv 3→4 3x3 pad 1 → reshape [batch, 16, 16] → MatMul [16, 8] →
    Flatten → Gemm (transB) [5, 128]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("wc", (4, 3, 3, 3)), ("wm", (16, 8)), ("wg", (5, 128)))]
    inits.append(numpy_helper.from_array(np.array([-1, 16, 16], np.int64), "shape"))
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "wm"], ["m"], name="matmul"),
             helper.make_node("Flatten", ["m"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wg"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


LAYERS = (QuantLayer("conv", "Conv", "wc", 0, "x"), QuantLayer("matmul", "MatMul", "wm", 1, "r"),
          QuantLayer("gemm", "Gemm", "wg", 0, "f"))


@pytest.mark.parametrize("batch", [1, 3])
def test_layer_flops_of_conv_matmul_and_gemm_match_hand_counts(batch):
    model = _three_layer_model(batch)
    flops = layer_flops(model, LAYERS, {"x": np.zeros((batch, 3, 8, 8), np.float32)}, batch)
    hand = {"conv": 2 * (3 * 3 * 3) * (4 * 8 * 8),  # depth C·kh·kw per output, 4x8x8 outputs
            "matmul": 2 * 16 * (16 * 8),  # K = 16 per output, 16x8 outputs
            "gemm": 2 * 128 * 5}  # K = 128 per output, 5 outputs
    assert flops == hand, f"per-sample FLOPs {flops}, by hand {hand}"


def test_a_layer_without_an_inferred_shape_counts_one_output_position():
    model = _three_layer_model(1)
    flops = layer_flops(model, LAYERS, {}, 1)  # no feed: no shape is known
    assert flops == {"conv": 2 * 4 * 3 * 3 * 3, "matmul": 2 * 16 * 8, "gemm": 2 * 5 * 128}, flops


def test_step_cost_counts_forward_backward_per_sample_and_the_fixed_overhead():
    assert step_cost(1e6, 32) == FWD_BWD * 32 * 1e6 + STEP_FIXED_FLOPS
    assert step_cost(1e6, 32, micro_batches=4) == FWD_BWD * 32 * 1e6 + 4 * STEP_FIXED_FLOPS
    # a weight is rounded once per step, whatever the micro-batches
    assert step_cost(1e6, 32, 4, weights=5000) == FWD_BWD * 32 * 1e6 + 4 * STEP_FIXED_FLOPS + WEIGHT_STEP_FLOPS * 5000
    # activation elements are touched once per sample of the step
    assert step_cost(1e6, 32, activations=700) == 32 * (FWD_BWD * 1e6 + ACT_STEP_FLOPS * 700) + STEP_FIXED_FLOPS


def _costs(*scores_and_costs, fixed=()) -> list[BlockCost]:
    """BlockCosts whose score is the given value (error = score × step FLOPs / FLOPs, FLOPs 1)."""
    blocks = [BlockCost(f"b{i}", 1.0, score * cost, cost) for i, (score, cost) in enumerate(scores_and_costs)]
    return blocks + [BlockCost(f"f{i}", 1.0, 0.5, 10.0, fixed=why) for i, why in enumerate(fixed)]


def test_split_gives_min_steps_in_score_order_while_the_budget_lasts():
    blocks = _costs((1.0, 10.0), (3.0, 10.0), (2.0, 10.0), fixed=("no torch converter for Foo (n)",))
    planned = split(2 * MIN_STEPS * 10.0 + 5.0, blocks, cap=100)  # two blocks' first steps, and a little
    steps = [b.steps for b in planned.blocks]
    assert steps == [0, MIN_STEPS, MIN_STEPS, 0], f"steps {steps}: the two best scores get MIN_STEPS first"
    assert "budget was spent" in planned.blocks[0].reason and "round-to-nearest" in planned.blocks[0].reason
    assert planned.blocks[3].reason.startswith("no torch converter for Foo (n)")
    assert planned.spent_flops <= planned.budget_flops
    assert [planned.iters_of(i) for i in range(4)] == steps


def test_split_tops_up_by_score_caps_at_the_iterations_and_keeps_to_the_total():
    blocks = _costs((2.0, 10.0), (1.0, 10.0), (4.0, 1000.0))
    budget = 3000.0 + 2 * MIN_STEPS * 10.0 + MIN_STEPS * 1000.0
    planned = split(budget, blocks, cap=400)
    steps = [b.steps for b in planned.blocks]
    extra = [s - MIN_STEPS for s in steps]
    print(f"steps {steps} under {budget:.0f} FLOPs, spent {planned.spent_flops:.0f}")
    assert planned.spent_flops <= budget
    assert all(MIN_STEPS <= s <= 400 for s in steps), steps
    assert extra[1] > 0 and 1.6 <= extra[0] / extra[1] <= 2.4, \
        f"top-up steps of two blocks of one cost must follow their scores 2:1: {extra}"
    assert budget - planned.spent_flops < 1000.0, "what is left must not buy another step of an uncapped block"
    rich = split(1e12, blocks, cap=400)
    assert [b.steps for b in rich.blocks] == [400] * 3 and "all 400 steps" in rich.blocks[0].reason
    short = split(1e12, blocks, cap=7)
    assert [b.steps for b in short.blocks] == [7] * 3, "a cap below MIN_STEPS caps the first steps too"
    assert [b.steps for b in split(0.0, blocks, cap=400).blocks] == [0, 0, 0]


def test_fast_sets_a_step_budget_and_a_time_budget_replaces_it():
    assert resolve(QuantConfig(preset="fast")).rounding.step_budget == FAST_STEP_BUDGET == 1.0
    assert resolve(QuantConfig()).rounding.step_budget == 0.0, "the default preset has no step budget, only a cap"
    assert resolve(QuantConfig(step_budget=2)).rounding.step_budget == 2.0
    timed = resolve(QuantConfig(preset="fast", time_budget=1.5)).rounding
    assert (timed.step_budget, timed.time_budget) == (0.0, 1.5)


@pytest.mark.parametrize("values, message", [
    (dict(step_budget=1.0, time_budget=2.0), "both set"),
    (dict(step_budget=0.0, time_budget=2.0), "both set"),
    (dict(step_budget=-2.0), "step_budget=-2.0 is out of range"),
    (dict(step_budget="lots"), "step_budget='lots' is out of range"),
    (dict(time_budget=-1.0), "time_budget=-1.0 is out of range"),
])
def test_bad_budgets_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**values)


@pytest.mark.parametrize("flags", [["--step-budget", "1", "--time-budget", "2"], ["--step-budget", "-3"],
                                   ["--time-budget", "-1"], ["--time-budget", "soon"]])
def test_bad_budget_flags_exit_2(tmp_path, flags):
    result = invoke("quantize", CNN, "--preset", "fast", "-o", tmp_path / "q.onnx", *flags)
    assert result.exit_code == 2, (result.exit_code, result.output)


def test_measure_rate_is_quick_and_plausible():
    t = time.perf_counter()
    rate = measure_rate()
    seconds = time.perf_counter() - t
    print(f"measured {rate / 1e9:.2f} GFLOP/s in {seconds:.2f} s")
    assert 1e8 < rate < 1e15 and seconds < 2.0


def test_preset_fast_writes_a_valid_model_and_the_step_budget_section(tmp_path, cnn_eval):
    out = tmp_path / "fast.onnx"
    result = invoke("quantize", CNN, "--preset", "fast", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert "step budget (step_budget 1 x" in result.stdout
    onnx.checker.check_model(onnx.load(out), full_check=True)
    report = json.loads((tmp_path / "fast.onnx.report.json").read_text())
    section = report["step_budget"]
    ran = [b["iters"] for b in report["blocks"]]
    planned = [b["steps"] for b in section["blocks"]]
    print(f"budget {section['budget_flops']:.3g} FLOPs, spent {section['spent_flops']:.3g}; planned {planned}, ran {ran}")
    assert [b["name"] for b in section["blocks"]] == [b["name"] for b in report["blocks"]]
    assert 0 < section["spent_flops"] <= section["budget_flops"]
    assert all(r <= p for r, p in zip(ran, planned)) and any(planned), (planned, ran)
    assert all(b["reason"] and b["score"] >= 0 for b in section["blocks"])
    assert report["reconstruction"]["steps_planned"] == sum(planned)
    logits = run_model(out, {"input": cnn_eval["input"][:16]})[0]
    assert np.isfinite(logits).all()


def _model_bytes(tmp_path, name, *flags) -> bytes:
    out = tmp_path / f"{name}.onnx"
    result = invoke("quantize", CNN, "--device", "cpu", "--seed", "0", "--quiet", "-o", out, *flags)
    assert result.exit_code == 0, result.output
    return out.read_bytes()


def test_no_budget_and_a_budget_covering_every_block_run_the_old_schedule(tmp_path):
    off = _model_bytes(tmp_path, "off", "--preset", "fast", "--step-budget", "0")
    explicit = _model_bytes(tmp_path, "explicit", "--iters", "100", "--early-stop", "20", "--batch-size", "32")
    assert off == explicit, "--preset fast --step-budget 0 must run fast's schedule with no budget"
    ample = tmp_path / "ample.onnx"
    assert _model_bytes(tmp_path, "ample", "--preset", "fast", "--step-budget", "1000") == off, \
        "a budget that pays every block's iterations must change nothing"
    assert json.loads((tmp_path / "off.onnx.report.json").read_text())["step_budget"] == {}
    assert ample.exists()


def test_a_time_budget_reports_the_measured_rate(tmp_path):
    config = QuantConfig(preset="fast", time_budget=0.001, calib_samples=96, verify_samples=16)
    report = onnxflex.quantize(CNN, config=config, progress=False).report
    section = report["step_budget"]
    assert section["flop_rate"] > 0 and section["basis"].startswith("time_budget 0.001 min")
    assert section["budget_flops"] == pytest.approx(0.001 * 60 * section["flop_rate"])


def test_a_fixed_batch_models_step_costs_every_micro_batch(tmp_path):
    """A fixed-batch-1 model learns in steps of ``accumulate`` micro-batches of one sample: the budget
    costs each step at all of its samples plus the fixed cost once per micro-batch."""
    from graphs import matmul_bias_mlp

    path = tmp_path / "mlp.onnx"
    onnx.save(matmul_bias_mlp(), path)
    config = QuantConfig(method="flexround", preset="fast", calib_samples=64, verify_samples=8)
    report = onnxflex.quantize(path, config=config, progress=False).report
    accumulate = report["reconstruction"]["accumulate"]
    assert report["reconstruction"]["batch_size"] == 1 and accumulate > 1, report["reconstruction"]
    rows = report["step_budget"]["blocks"]
    assert rows and all(b["weights"] > 0 and b["activations"] > 0 and b["step_flops"] == pytest.approx(
        step_cost(b["flops_per_sample"], accumulate, accumulate, b["weights"], b["activations"])) for b in rows), rows


def _lstm_model(steps: int, batch: int = 1) -> onnx.ModelProto:
    """x[steps, batch, 4] → bidirectional LSTM, hidden 3 (W [2, 12, 4], R [2, 12, 3])."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W", (2, 12, 4)), ("R", (2, 12, 3)))]
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y", "yh", "yc"], name="lstm", hidden_size=3,
                            direction="bidirectional")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, batch, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_a_recurrent_layer_costs_its_weights_once_per_time_step():
    """An LSTM multiplies W (on x_t) and R (on h_t-1) at every one of its T steps: 2 × (W + R values) × T per
    sample, its W and R layers summed under the node's name; without the input's shape, one step."""
    layers = (QuantLayer("lstm", "LSTM", "W", 1, "x"), QuantLayer("lstm", "LSTM", "R", 1, "x"))
    model = _lstm_model(7, batch=2)
    flops = layer_flops(model, layers, {"x": np.zeros((7, 2, 4), np.float32)}, 2)
    assert flops == {"lstm": 2 * (2 * 12 * 4 + 2 * 12 * 3) * 7}, flops
    assert layer_flops(model, layers, {}, 2) == {"lstm": 2 * (2 * 12 * 4 + 2 * 12 * 3)}


def _reshape_from_shape_model() -> onnx.ModelProto:
    """x[N, 6, 4] → Reshape to [N·6, 4], the N·6 computed Shape → Gather → Mul (opset 13: Mul carries
    no values through shape inference) → Gemm (transB) [5, 4] → y[N·6, 5] → z[N, 6, 5]."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "wg"),
             numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array(1, np.int64), "i1"),
             numpy_helper.from_array(np.array([4], np.int64), "k"), numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.array([-1, 6, 5], np.int64), "back")]
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["n"], name="gather_n"),
             helper.make_node("Gather", ["s", "i1"], ["t"], name="gather_t"),
             helper.make_node("Mul", ["n", "t"], ["nt"], name="mul"),
             helper.make_node("Unsqueeze", ["nt", "ax"], ["nt1"], name="unsqueeze"),
             helper.make_node("Concat", ["nt1", "k"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
             helper.make_node("Gemm", ["flat", "wg"], ["y"], name="gemm", transB=1),
             helper.make_node("Reshape", ["y", "back"], ["z"], name="unflatten")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_block_shapes_know_a_reshape_that_whole_model_inference_cannot():
    from onnxflex.graph import block_shapes, static_shapes

    model = _reshape_from_shape_model()
    feed = {"x": np.zeros((3, 6, 4), np.float32)}
    assert "y" not in static_shapes(model, feed), "the case needs a shape whole-model inference leaves unknown"
    shapes = block_shapes(model, [n.name for n in model.graph.node], feed)
    assert shapes["flat"][0] == (18, 4) and shapes["y"][0] == (18, 5), shapes
    layers = (QuantLayer("gemm", "Gemm", "wg", 0, "flat"),)
    assert layer_flops(model, layers, feed, 3, shapes) == {"gemm": 2 * 4 * (6 * 5)}
    assert layer_flops(model, layers, feed, 3) == {"gemm": 2 * 4 * 5}, "without them: one output position"


def test_the_budget_reads_a_layers_shape_from_its_blocks_captured_inputs(tmp_path):
    """End to end: the fast preset's budget charges the Gemm after a data-computed Reshape for its six
    output rows per sample (known_shapes on the captured block inputs), and charges its weight values."""
    x = np.random.default_rng(3).standard_normal((40, 6, 4)).astype(np.float32)
    config = QuantConfig(method="flexround", preset="fast", calib_samples=40, verify_samples=8)
    report = onnxflex.quantize(_reshape_from_shape_model(), {"x": x}, config, progress=False).report
    rows = report["step_budget"]["blocks"]
    assert [(b["flops_per_sample"], b["weights"]) for b in rows] == [(2 * 4 * (6 * 5), 20)], rows
    assert report["step_budget"]["weight_step_flops"] == WEIGHT_STEP_FLOPS


def test_only_a_shape_that_needs_captured_tensors_plans_the_budget_after_capture():
    """needs_captured_shapes: the Gemm after a data-computed Reshape needs its block's captured inputs
    (the budget is then planned after capture, which stores every row); a Conv's shape does not."""
    from onnxflex.budget import needs_captured_shapes

    x = np.random.default_rng(3).standard_normal((4, 6, 4)).astype(np.float32)
    reshaped = build_plan(_reshape_from_shape_model(), resolve(QuantConfig()).plan)
    assert needs_captured_shapes(reshaped, CalibrationSet({"x": x}, "test"))
    conv, data = _conv_plan(8)
    assert not needs_captured_shapes(conv, data)


@pytest.mark.parametrize("values, cap", [
    ({}, DEFAULT_STEP_CAP), (dict(iters=50), DEFAULT_STEP_CAP), (dict(step_budget=0), 0.0),
    (dict(step_budget=3), 0.0), (dict(time_budget=2.0), 0.0), (dict(preset="fast"), 0.0), (dict(preset="best"), 0.0)])
def test_only_the_default_preset_caps_the_learning_and_any_budget_replaces_the_cap(values, cap):
    assert resolve(QuantConfig(**values)).rounding.step_cap == cap, values


def _conv_plan(side: int, samples: int = 4):
    """A plan of one Conv 3->512 3x3 on side x side inputs, and ``samples`` calibration samples."""
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.standard_normal((512, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, side, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = CalibrationSet({"x": rng.standard_normal((samples, 3, side, side)).astype(np.float32)}, "test")
    return build_plan(model, resolve(QuantConfig()).plan), data


def test_the_default_cap_bites_on_a_big_plan_and_leaves_a_small_one_untouched():
    config = resolve(QuantConfig()).rounding
    per_step = 3 * 3 * 3 * 2 * 512 * 4 * FWD_BWD  # FLOPs per output pixel of a step on 4 samples
    side = int(np.ceil(np.sqrt(3 * config.step_cap / (config.iters * per_step))))  # full schedule ~3x the cap
    small, small_data = _conv_plan(16)
    assert full_schedule_flops(block_costs(small, small_data, config), config.iters) < config.step_cap
    assert plan_budget(small, small_data, config) is None, "a plan within the cap must run the full schedule"
    big, big_data = _conv_plan(side)
    full = full_schedule_flops(block_costs(big, big_data, config), config.iters)
    budget = plan_budget(big, big_data, config)
    print(f"side {side}: full schedule {full:.3g} FLOPs, cap {config.step_cap:.3g}; steps {budget.iters_of(0)}")
    assert 2.5 < full / config.step_cap < 3.5, full
    assert budget is not None and 0 < budget.spent_flops <= config.step_cap == budget.budget_flops
    assert MIN_STEPS <= budget.iters_of(0) < config.iters, budget.iters_of(0)
    assert budget.basis.startswith("the default preset's cap of") and "would cost" in budget.basis, budget.basis
    assert "of 400 steps: its share of the budget" in budget.blocks[0].reason, budget.blocks[0].reason
    uncapped = resolve(QuantConfig(step_budget=0)).rounding
    assert plan_budget(big, big_data, uncapped) is None, "--step-budget 0 must give the full schedule"


def test_the_default_preset_on_the_cnn_is_within_the_cap_and_unchanged(tmp_path):
    capped = _model_bytes(tmp_path, "capped")
    assert capped == _model_bytes(tmp_path, "uncapped", "--step-budget", "0"), \
        "the default preset's cap must not change a model whose full schedule fits in it"
    report = json.loads((tmp_path / "capped.onnx.report.json").read_text())
    assert report["step_budget"] == {} and report["reconstruction"]["step_cap"] == DEFAULT_STEP_CAP
    assert [b["iters"] for b in report["blocks"]] == [400] * len(report["blocks"]), report["blocks"]


def test_a_step_budget_charges_the_blocks_activations_and_the_default_cap_does_not():
    """The fast preset's step budget costs each step's output elements (ACT_STEP_FLOPS per sample);
    the default preset's cap, set without them, costs a block as before."""
    plan, data = _conv_plan(16)
    fast = resolve(QuantConfig(preset="fast")).rounding
    (cost,) = block_costs(plan, data, fast)
    per_step = min(fast.batch_size * fast.accumulate, data.num_samples)
    assert cost.activations == 512 * 16 * 16, cost  # the Conv's output [N, 512, 16, 16] per sample
    assert cost.step_flops == pytest.approx(step_cost(cost.flops, per_step, fast.accumulate, cost.weights, 512 * 16 * 16))
    default = resolve(QuantConfig()).rounding
    (capped,) = block_costs(plan, data, default)
    assert capped.activations == 0.0 and capped.step_flops == pytest.approx(
        step_cost(capped.flops, per_step, default.accumulate, capped.weights)), capped
