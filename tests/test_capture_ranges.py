"""Activation ranges from the capture run (rounding/actcapture.py): the same steps as the FP torch run
of every block gives, up to float rounding; blocks with a subgraph keep the torch run."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs  # tests/graphs.py; tests/ is on pytest's pythonpath
import onnxflex
from onnxflex import stages
from onnxflex.rounding import reconstruct, torchify
from onnx import TensorProto, helper
from test_control_flow import _branch


def act_steps(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of each activation QuantizeLinear by the tensor it reads (subgraphs included)."""
    steps = {}

    def walk(graph: onnx.GraphProto, outer: dict) -> None:
        inits = {**outer, **{t.name: numpy_helper.to_array(t) for t in graph.initializer}}
        for node in graph.node:
            if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
                steps[node.input[0]] = (float(inits[node.input[1]]), int(inits[node.input[2]]))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, inits)

    walk(model.graph, {})
    return steps


def torch_runs(monkeypatch) -> list[str]:
    """Records the blocks whose act ranges come from the FP torch run (their names, in order)."""
    ran: list[str] = []
    original = reconstruct._observed_run

    def recorded(module, *args, **kwargs):
        ran.append(module.block.name)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(reconstruct, "_observed_run", recorded)
    return ran


def both_ways(monkeypatch, model, data, config) -> tuple[onnxflex.QuantResult, onnxflex.QuantResult, list[str]]:
    """(result with the capture run's ranges, result with the torch run's for every block, the blocks the
    first run still calibrated in torch)."""
    ran = torch_runs(monkeypatch)
    captured = onnxflex.quantize(model, data, config, progress=False)
    in_torch = list(ran)
    with monkeypatch.context() as m:
        m.setattr(stages, "act_observers", lambda *args, **kwargs: None)
        everything = onnxflex.quantize(model, data, config, progress=False)
    return captured, everything, in_torch


@pytest.mark.parametrize("scale", ["percentile", "minmax"])
def test_capture_run_ranges_match_the_torch_runs(monkeypatch, scale):
    """MobileNetV3-style blocks (HardSwish, a squeeze-excite gate, per-tensor steps on every weighted
    input): no block runs in torch to calibrate, and every activation step and zero point equals the one
    the torch run gives, up to float rounding between onnxruntime and torch."""
    model = graphs.hardswish_se()
    data = {"x": np.random.default_rng(0).standard_normal((96, 3, 16, 16)).astype(np.float32) * 3}
    config = onnxflex.QuantConfig(method="rtn", act_scale=scale, verify_samples=0)
    captured, everything, in_torch = both_ways(monkeypatch, model, data, config)
    assert in_torch == [], f"blocks calibrated by a torch run: {in_torch}"
    ours, theirs = act_steps(captured.model), act_steps(everything.model)
    assert ours.keys() == theirs.keys() and len(ours) >= 4, (sorted(ours), sorted(theirs))
    for name, (s, z) in ours.items():
        assert s == pytest.approx(theirs[name][0], rel=1e-5), (name, s, theirs[name][0])
        assert abs(z - theirs[name][1]) <= 1, (name, z, theirs[name][1])
    worst = max(abs(s / theirs[n][0] - 1) for n, (s, _) in ours.items())
    print(f"{scale}: {len(ours)} activation steps, largest relative difference {worst:.2g}")


def front_then_if() -> onnx.ModelProto:
    """conv0 → relu → conv1 → relu → If(sr == 16000): then Conv 'conv_16k', else MatMul 'matmul_8k';
    sr a 0-d int64 input. Two blocks: the first without a subgraph, the second holding the If."""
    b = graphs._Builder(3)
    b.node("Conv", ["x", b.conv_weight("w0", 8, 3, 3), b.small("b0", (8,))], ["c0"], name="conv0", pads=[1, 1, 1, 1])
    b.node("Relu", ["c0"], ["r0"], name="relu0")
    b.node("Conv", ["r0", b.conv_weight("w1", 8, 8, 3)], ["c1"], name="conv1", pads=[1, 1, 1, 1])
    b.node("Relu", ["c1"], ["a"], name="relu1")
    b.node("Equal", ["sr", b.const("rate", np.array(16000, np.int64))], ["is16k"], name="is16k")
    then_g, else_g = _branch(b, "conv_16k", "Conv"), _branch(b, "matmul_8k", "MatMul")
    b.node("If", ["is16k"], ["y"], name="by_rate", then_branch=then_g, else_branch=else_g)
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    return b.model("front_then_if", [graphs._image(size=8), sr], [graphs._out(graphs.N, 8, 8, 8)], opset=13)


def test_a_block_holding_an_if_keeps_the_torch_run(monkeypatch):
    """conv0 → conv1 → If (a Conv or a MatMul branch, sr unpinned): the If's block (its inner points, the
    branch taken) calibrates in its torch run, the other from the capture run; the steps match the all
    torch run, the inner points' included."""
    model = front_then_if()
    data = {"x": np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32),
            "sr": np.array(16000, np.int64)}
    config = onnxflex.QuantConfig(method="rtn", verify_samples=0)
    captured, everything, in_torch = both_ways(monkeypatch, model, data, config)
    blocks = {b["name"]: b for b in captured.report["blocks"]}
    plan = onnxflex.pipeline.build_plan(model, onnxflex.options.resolve(config).plan)
    ops = {n.name: n.op_type for n in plan.model.graph.node}
    with_if = [b.name for b in plan.blocks if any(ops[n] == "If" for n in b.nodes)]
    assert in_torch == with_if and len(blocks) > len(with_if), (in_torch, with_if, list(blocks))
    ours, theirs = act_steps(captured.model), act_steps(everything.model)
    assert ours.keys() == theirs.keys(), (sorted(ours), sorted(theirs))
    inner = set(ours) - {n for n in (o for node in captured.model.graph.node for o in node.output)} - {"x"}
    assert inner, f"no point inside the If branch is quantized: {sorted(ours)}"
    for name, (s, z) in ours.items():
        assert s == pytest.approx(theirs[name][0], rel=1e-5) and abs(z - theirs[name][1]) <= 1, name


def test_a_converter_refusing_at_run_time_still_sends_the_block_to_onnxruntime(monkeypatch):
    """A block whose ranges come from the capture run is still run once in torch before it learns: a
    converter that refuses only when it runs (NotImplementedError) sends the block to onnxruntime, as
    the torch calibration run did."""
    model = graphs.hardswish_se()
    data = {"x": np.random.default_rng(2).standard_normal((32, 3, 16, 16)).astype(np.float32)}
    forward = torchify.BlockModule.forward
    refused = []

    def refusing(self, feeds, *args, **kwargs):
        if "excited" in self.block.outputs and not self.quantize:
            refused.append(self.block.name)
            raise NotImplementedError("refused at run time")
        return forward(self, feeds, *args, **kwargs)

    monkeypatch.setattr(torchify.BlockModule, "forward", refusing)
    ran = torch_runs(monkeypatch)
    result = onnxflex.quantize(model, data, onnxflex.QuantConfig(method="rtn", verify_samples=0), progress=False)
    runtimes = {b["name"]: b["runtime"] for b in result.report["blocks"]}
    assert refused and runtimes[refused[0]] == "onnxruntime", (refused, runtimes)
    assert ran == [], f"blocks calibrated by a torch run: {ran}"


def test_a_point_folding_the_samples_into_another_axis_is_observed_in_capture(monkeypatch):
    """x[N, 6, 4] → Reshape to [N·6, 4] → Gemm: the Gemm's input point carries no sample axis, which a
    stored tensor must (capture refuses one), but its range needs none: it is observed in the capture
    run, and its step equals the torch run's."""
    from test_budget import _reshape_from_shape_model

    x = np.random.default_rng(4).standard_normal((40, 6, 4)).astype(np.float32)
    config = onnxflex.QuantConfig(method="rtn", verify_samples=0)
    captured, everything, in_torch = both_ways(monkeypatch, _reshape_from_shape_model(), {"x": x}, config)
    assert in_torch == [], f"blocks calibrated by a torch run: {in_torch}"
    ours, theirs = act_steps(captured.model), act_steps(everything.model)
    assert "flat" in ours and ours.keys() == theirs.keys(), (sorted(ours), sorted(theirs))
    for name, (s, z) in ours.items():
        assert s == pytest.approx(theirs[name][0], rel=1e-5) and abs(z - theirs[name][1]) <= 1, name


def test_points_sharing_a_concat_step_pool_in_the_capture_run(monkeypatch):
    """TensorRT ties the steps of a Concat's inputs: the tied points pool their values in the capture run
    as their one quantizer does, no block calibrates in torch, and every step equals the torch run's."""
    from test_tensorrt import two_branch_concat

    model = two_branch_concat()
    config = onnxflex.QuantConfig(method="rtn", target="tensorrt", verify_samples=0)
    captured, everything, in_torch = both_ways(monkeypatch, model, graphs.random_calibration(model, 96, 2), config)
    assert in_torch == [], f"blocks calibrated by a torch run: {in_torch}"
    ours, theirs = act_steps(captured.model), act_steps(everything.model)
    assert ours["a"] == ours["b"] and ours.keys() == theirs.keys(), (ours, theirs)
    for name, (s, z) in ours.items():
        assert s == pytest.approx(theirs[name][0], rel=1e-5) and z == theirs[name][1], name


def test_the_observers_thread_sees_every_batch_in_order_and_its_error_reaches_the_caller(monkeypatch):
    """capture.capture hands each run's act point values to the observers in a thread of their own while
    onnxruntime runs the next batch: every batch arrives, in order, and an observer's error stops the run
    with that error."""
    from onnxflex import capture
    from onnxflex.rounding.actcapture import CaptureObservers

    monkeypatch.setattr(capture, "CAPTURE_BATCH", 8)
    x = np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32)
    firsts: list[float] = []
    observe = CaptureObservers.observe

    def recorded(self, values, layout, samples):
        firsts.append(float(values["x"].reshape(-1)[0]))
        if len(firsts) == failing:
            raise RuntimeError("observer failed")
        return observe(self, values, layout, samples)

    monkeypatch.setattr(CaptureObservers, "observe", recorded)
    config = onnxflex.QuantConfig(method="rtn", verify_samples=0, calib_samples=0)
    failing = 0
    onnxflex.quantize(graphs.hardswish_se(), {"x": x}, config, progress=False)
    assert firsts == [float(v) for v in x[::8, 0, 0, 0]], firsts
    firsts.clear()
    failing = 3
    with pytest.raises(RuntimeError, match="observer failed"):
        onnxflex.quantize(graphs.hardswish_se(), {"x": x}, config, progress=False)
    assert len(firsts) == 3, f"the run went on past the failed batch: {len(firsts)} batches observed"
