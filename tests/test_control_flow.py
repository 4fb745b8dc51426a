"""Control flow: pinned inputs fold the If branches they select; layers inside If branches and
Loop/Scan bodies that cannot fold are quantized in place."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphs  # tests/graphs.py; tests/ is on pytest's pythonpath
import onnxflex
from helpers import run_model
from onnxflex.check import check
from onnxflex.errors import ConfigError
from onnxflex.options import resolve
from onnxflex.pipeline import build_plan
from onnxflex.qparams import sqnr_db
from onnxflex.verify import optimized_op_counts

CALIB = 64


def _branch(b: graphs._Builder, name: str, op: str) -> onnx.GraphProto:
    """A branch that reads the outer ``a`` [N, 8, 8, 8]: a 3x3 Conv, or a MatMul over the last axis."""
    if op == "Conv":
        w = b.conv_weight(f"{name}_w", 8, 8, 3)
        nodes = [helper.make_node("Conv", ["a", w], [f"{name}_out"], name=name, pads=[1, 1, 1, 1])]
    else:
        w = b.he(f"{name}_w", (8, 8), 8)
        nodes = [helper.make_node("MatMul", ["a", w], [f"{name}_out"], name=name)]
    inits = [t for t in b.inits if t.name == w]
    b.inits = [t for t in b.inits if t.name != w]  # the weight lives in the branch
    return helper.make_graph(nodes, f"{name}_graph", [], [helper.make_tensor_value_info(f"{name}_out",
                                                                                         TensorProto.FLOAT, None)],
                             inits)


def streaming_model() -> onnx.ModelProto:
    """conv1 → If(sr == 16000): then Conv 'conv_16k', else MatMul 'matmul_8k' → conv2; sr a 0-d int64 input."""
    b = graphs._Builder(0)
    b.node("Conv", ["x", b.conv_weight("w1", 8, 3, 3), b.small("b1", (8,))], ["c1"], name="conv1", pads=[1, 1, 1, 1])
    b.node("Relu", ["c1"], ["a"], name="relu1")
    b.node("Equal", ["sr", b.const("rate", np.array(16000, np.int64))], ["is16k"], name="is16k")
    then_g, else_g = _branch(b, "conv_16k", "Conv"), _branch(b, "matmul_8k", "MatMul")
    b.node("If", ["is16k"], ["g"], name="by_rate", then_branch=then_g, else_branch=else_g)
    b.node("Relu", ["g"], ["r"], name="relu2")
    b.node("Conv", ["r", b.conv_weight("w2", 8, 8, 3)], ["y"], name="conv2", pads=[1, 1, 1, 1])
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    return b.model("streaming", [graphs._image(size=8), sr], [graphs._out(graphs.N, 8, 8, 8)], opset=13)


def _images(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def _weight_dtype(model: onnx.ModelProto, node_name: str, graph: onnx.GraphProto | None = None) -> int | None:
    """Element type of the integer initializer behind ``node_name``'s weight DequantizeLinear."""
    g = graph or model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    node = next(n for n in g.node if n.name == node_name)
    dq = producer.get(node.input[1])
    return inits[dq.input[0]].data_type if dq is not None and dq.op_type == "DequantizeLinear" else None


def test_pinned_input_folds_the_if_and_the_taken_branch_is_learned(caplog):
    model = streaming_model()
    config = onnxflex.QuantConfig(fix_inputs=("sr=16000",), iters=20, batch_size=16)
    plan = build_plan(model, resolve(config).plan)
    assert not [n for n in plan.model.graph.node if n.op_type == "If"]
    assert [l.node for l in plan.layers] == ["conv1", "conv_16k", "conv2"], [l.node for l in plan.layers]
    with caplog.at_level("WARNING", logger="onnxflex"):
        result = onnxflex.quantize(model, _images(CALIB, 0), config, progress=False)
    pins = [w for w in result.report["warnings"] if "pinned to 16000" in w]
    assert len(pins) == 1 and "specialised" in pins[0], result.report["warnings"]
    assert caplog.text.count("pinned to 16000") == 1, caplog.text
    qmodel = result.model
    onnx.checker.check_model(qmodel, full_check=True)
    assert "If" not in {n.op_type for n in qmodel.graph.node}
    assert "sr" in {i.name for i in qmodel.graph.input}, "the pinned input is no longer declared"
    assert _weight_dtype(qmodel, "conv_16k") == TensorProto.INT8
    assert all(b["iters"] > 0 and b["runtime"] == "torch" for b in result.report["blocks"]), result.report["blocks"]
    counts = optimized_op_counts(qmodel)
    assert counts.get("QLinearConv") == 3, counts
    feeds = _images(16, 7)
    reference = run_model(model, {**feeds, "sr": np.array(16000, np.int64)})[0]
    for quantized_feeds in (feeds, {**feeds, "sr": np.array(16000, np.int64)}):  # fed or not, it runs
        db = sqnr_db(reference, run_model(qmodel, quantized_feeds)[0])
        assert db >= 25, f"SQNR {db:.1f} dB < 25 dB against FP32 at sr=16000"


def test_cli_fix_input_needs_no_data_for_the_pinned_input(tmp_path):
    from click.testing import CliRunner

    from onnxflex.cli import main

    path, calib, out = tmp_path / "stream.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(streaming_model(), path)
    np.savez(calib, **_images(CALIB, 0))  # no 'sr' in the data
    result = CliRunner().invoke(main, ["quantize", str(path), "--calib", str(calib), "--method", "rtn", "--quiet",
                                       "--fix-input", "sr=8000", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    qmodel = onnx.load(out)
    assert "If" not in {n.op_type for n in qmodel.graph.node}
    assert _weight_dtype(qmodel, "matmul_8k") == TensorProto.INT8, "the 8 kHz branch's MatMul is not quantized"
    # the original reads 'sr', the pinned model declares it with a default: compare feeds it to both
    np.savez(tmp_path / "eval.npz", **_images(16, 7), sr=np.array(8000, np.int64))
    compared = CliRunner().invoke(main, ["compare", str(path), str(out), "--data", str(tmp_path / "eval.npz"),
                                         "--repeats", "1", "--min-sqnr", "20"], catch_exceptions=False)
    assert compared.exit_code == 0, compared.output


def nested_model() -> onnx.ModelProto:
    """An If on sr > 8000 whose then branch is an If on sr == 16000: two folds, innermost Conv taken."""
    model = streaming_model()
    outer_if = next(n for n in model.graph.node if n.op_type == "If")
    b = graphs._Builder(3)
    fallback = _branch(b, "conv_low", "Conv")
    inner = helper.make_graph([onnx.helper.make_node("If", ["is16k"], ["inner_g"], name="inner_by_rate")],
                              "inner", [], [helper.make_tensor_value_info("inner_g", TensorProto.FLOAT, None)])
    inner.node[0].attribute.extend(outer_if.attribute)
    outer_if.input[0] = "above8k"
    del outer_if.attribute[:]
    outer_if.attribute.extend([helper.make_attribute("then_branch", inner),
                               helper.make_attribute("else_branch", fallback)])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(8000, np.int64), "eight_k"))
    model.graph.node.insert(3, helper.make_node("Greater", ["sr", "eight_k"], ["above8k"], name="above8k"))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_nested_ifs_on_a_pinned_input_fold_to_the_inner_branch():
    plan = build_plan(nested_model(), resolve(onnxflex.QuantConfig(fix_inputs=("sr=16000",))).plan)
    assert not [n for n in plan.model.graph.node if n.op_type == "If"]
    assert [l.node for l in plan.layers] == ["conv1", "conv_16k", "conv2"], [l.node for l in plan.layers]


def test_pinning_an_unknown_input_names_it():
    with pytest.raises(ConfigError, match=r"--fix-input rate=8000: the model has no input 'rate'"):
        build_plan(streaming_model(), resolve(onnxflex.QuantConfig(fix_inputs=("rate=8000",))).plan)


# --- layers inside subgraphs that do not fold -----------------------------------------------------------


def dynamic_model() -> onnx.ModelProto:
    """conv1 → If(mean(x) > 0): then Conv 'then_conv', else Conv 'else_conv' → Loop twice v = v · W
    (MatMul 'loop_matmul' over the last axis, v starting at the If's output) → conv2."""
    b = graphs._Builder(1)
    b.node("Conv", ["x", b.conv_weight("w1", 8, 3, 3), b.small("b1", (8,))], ["c1"], name="conv1", pads=[1, 1, 1, 1])
    b.node("Relu", ["c1"], ["a"], name="relu1")
    b.node("ReduceMean", ["x"], ["m"], name="mean", keepdims=0)
    b.node("Greater", ["m", b.const("zero", np.array(0.0, np.float32))], ["positive"], name="positive")
    then_g, else_g = _branch(b, "then_conv", "Conv"), _branch(b, "else_conv", "Conv")
    b.node("If", ["positive"], ["g"], name="by_sign", then_branch=then_g, else_branch=else_g)
    wm = numpy_helper_from(b.rng.standard_normal((8, 8)).astype(np.float32) * 0.35, "loop_w")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("MatMul", ["v_in", "loop_w"], ["v_out"], name="loop_matmul")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)], [wm])
    trips, go = b.const("trips", np.array(2, np.int64)), b.const("go", np.array(True))
    b.node("Loop", [trips, go, "g"], ["l"], name="repeat", body=body)
    b.node("Relu", ["l"], ["r"], name="relu2")
    b.node("Conv", ["r", b.conv_weight("w2", 8, 8, 3)], ["y"], name="conv2", pads=[1, 1, 1, 1])
    return b.model("dynamic", [graphs._image(size=8)], [graphs._out(graphs.N, 8, 8, 8)], opset=13)


def numpy_helper_from(array: np.ndarray, name: str) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(array, name)


def _positive_images(n: int, seed: int) -> dict[str, np.ndarray]:
    """Images whose mean is above 0: the If always takes its then branch."""
    return {"x": _images(n, seed)["x"] + 0.5}


def _subgraph(model: onnx.ModelProto, node: str, attr: str) -> onnx.GraphProto:
    owner = next(n for n in model.graph.node if n.name == node)
    return next(a.g for a in owner.attribute if a.name == attr)


def _all_ops(graph: onnx.GraphProto) -> list[str]:
    ops = []
    for node in graph.node:
        ops.append(node.op_type)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ops += _all_ops(a.g)
    return ops


def test_layers_inside_if_and_loop_are_quantized_in_place(caplog):
    model = dynamic_model()
    with caplog.at_level("WARNING", logger="onnxflex"):
        result = onnxflex.quantize(model, _positive_images(CALIB, 0), onnxflex.QuantConfig(method="rtn"),
                                   progress=False)
    assert "'by_sign': else_branch never ran on the calibration data; its layer(s) else_conv" in caplog.text, \
        caplog.text
    qmodel = result.model
    onnx.checker.check_model(qmodel, full_check=True)
    then_g, else_g = _subgraph(qmodel, "by_sign", "then_branch"), _subgraph(qmodel, "by_sign", "else_branch")
    body = _subgraph(qmodel, "repeat", "body")
    for graph, node in ((then_g, "then_conv"), (else_g, "else_conv"), (body, "loop_matmul")):
        assert _weight_dtype(qmodel, node, graph) == TensorProto.INT8, f"{node}: weight not int8"
    for graph in (then_g, body):
        ops = [n.op_type for n in graph.node]
        assert "QuantizeLinear" in ops, f"{graph.name}: no activation Q/DQ: {ops}"
    assert "QuantizeLinear" not in [n.op_type for n in else_g.node], "the branch never taken got activation Q/DQ"
    verification = result.report["verification"]
    counts = verification["optimized_graph_ops"]
    assert counts.get("QLinearConv") == 3 and counts.get("QLinearMatMul") == 1, counts
    report = check(qmodel)  # onnxflex check --target onnxruntime
    runtime_ops = report.runtime_ops
    assert runtime_ops.get("QLinearConv") == 3 and runtime_ops.get("QLinearMatMul") == 1, runtime_ops
    kernels = {l.node: l.kernel for l in report.layers}
    assert kernels.get("then_conv") == "QLinearConv" and kernels.get("loop_matmul") == "QLinearMatMul", kernels
    assert kernels.get("else_conv") == "Conv" and not report.ok, "the branch never taken runs a float Conv"
    warning = next(w for w in result.report["warnings"] if w.startswith("node 'by_sign' (If)"))
    assert "2 layer(s) inside (else_conv, then_conv) get round-to-nearest int8 weights" in warning, warning
    sim = verification["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 30, f"onnxruntime vs simulation {sim:.1f} dB < 30 dB"
    feeds = _positive_images(16, 7)
    db = sqnr_db(run_model(model, feeds)[0], run_model(qmodel, feeds)[0])
    assert db >= 25, f"SQNR {db:.1f} dB < 25 dB against FP32"


def scan_model() -> onnx.ModelProto:
    """conv1 → Scan over the channels of its output: each [N, 8, 8] plane times W (MatMul 'plane_matmul')
    → conv2."""
    b = graphs._Builder(2)
    b.node("Conv", ["x", b.conv_weight("w1", 8, 3, 3)], ["c1"], name="conv1", pads=[1, 1, 1, 1])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["plane", "plane_w"], ["mixed"], name="plane_matmul")], "body",
        [helper.make_tensor_value_info("plane", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("mixed", TensorProto.FLOAT, None)],
        [numpy_helper_from(b.rng.standard_normal((8, 8)).astype(np.float32) * 0.35, "plane_w")])
    b.node("Scan", ["c1"], ["s"], name="per_channel", body=body, num_scan_inputs=1, scan_input_axes=[1],
           scan_output_axes=[1])
    b.node("Conv", ["s", b.conv_weight("w2", 8, 8, 3)], ["y"], name="conv2", pads=[1, 1, 1, 1])
    return b.model("scanned", [graphs._image(size=8)], [graphs._out(graphs.N, 8, 8, 8)], opset=13)


def test_a_matmul_inside_a_scan_body_is_an_integer_kernel():
    model = scan_model()
    result = onnxflex.quantize(model, _images(CALIB, 0), onnxflex.QuantConfig(method="rtn"), progress=False)
    body = _subgraph(result.model, "per_channel", "body")
    assert _weight_dtype(result.model, "plane_matmul", body) == TensorProto.INT8
    verification = result.report["verification"]
    assert verification["optimized_graph_ops"].get("QLinearMatMul") == 1, verification["optimized_graph_ops"]
    sim = verification["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 30, f"onnxruntime vs simulation {sim:.1f} dB < 30 dB"
    feeds = _images(16, 7)
    db = sqnr_db(run_model(model, feeds)[0], run_model(result.model, feeds)[0])
    assert db >= 25, f"SQNR {db:.1f} dB < 25 dB against FP32"


def test_a_weight_given_as_a_constant_node_inside_a_subgraph_is_quantized():
    """A frozen torch module exports its branch weights as Constant nodes, not initializers (as in
    tests/zoo/vad_stream.onnx); canonicalize makes them the subgraph's initializers, so the layer is found."""
    model = scan_model()
    body = _subgraph(model, "per_channel", "body")
    weight = body.initializer.pop()
    body.node.insert(0, helper.make_node("Constant", [], [weight.name], name="plane_w_constant", value=weight))
    result = onnxflex.quantize(model, _images(CALIB, 0), onnxflex.QuantConfig(method="rtn"), progress=False)
    assert _weight_dtype(result.model, "plane_matmul", _subgraph(result.model, "per_channel", "body")) == TensorProto.INT8
    kernels = {l.node: l.kernel for l in check(result.model).layers}
    assert kernels.get("plane_matmul") == "QLinearMatMul", kernels


# --- an If that does not fold runs in torch ---------------------------------------------------------------


def branch_first_model() -> onnx.ModelProto:
    """relu(x) → If(sr == 16000): then Conv 'conv_16k', else MatMul 'matmul_8k' → y; the block holding
    the If has no other layer, so what its reconstruction learns is the taken branch's."""
    b = graphs._Builder(4)
    b.node("Relu", ["x"], ["a"], name="relu0")
    b.node("Equal", ["sr", b.const("rate", np.array(16000, np.int64))], ["is16k"], name="is16k")
    then_g, else_g = _branch(b, "conv_16k", "Conv"), _branch(b, "matmul_8k", "MatMul")
    b.node("If", ["is16k"], ["y"], name="by_rate", then_branch=then_g, else_branch=else_g)
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    return b.model("branch_first", [graphs._image(channels=8, size=8), sr], [graphs._out(graphs.N, 8, 8, 8)],
                   opset=13)


def _if_block(model: onnx.ModelProto, config: onnxflex.QuantConfig):
    plan = build_plan(model, resolve(config).plan)
    by_name = {n.name: n for n in plan.model.graph.node}
    (block,) = [b for b in plan.blocks if any(by_name[n].op_type == "If" for n in b.nodes)]
    return plan, block


@pytest.mark.parametrize("make, rates", [(streaming_model, (16000, 8000)), (nested_model, (16000, 12000, 8000))])
def test_the_torch_if_matches_onnxruntime_on_every_branch(make, rates):
    """The float block holding the If (nested Ifs too), run by BlockModule, against onnxruntime on the
    same block extracted as a model, for a rate that takes each branch."""
    import torch

    from onnxflex.graph import default_opset
    from onnxflex.rounding.ortblock import extract_block
    from onnxflex.rounding.reconstruct import add_block_quantizers
    from onnxflex.rounding.torchify import BlockModule, QuantState
    from onnxflex.runtimes.targets import get_target

    config = onnxflex.QuantConfig()
    plan, block = _if_block(make(), config)
    assert not block.unsupported, block.unsupported
    state, device = QuantState(), torch.device("cpu")
    add_block_quantizers(block, plan.model, state, get_target("onnxruntime"), resolve(config).rounding, "rtn", device)
    module = BlockModule(block, plan.model, default_opset(plan.model), state, device)
    module.quantize = False
    standalone = extract_block(plan.model, block)
    x = _images(4, 3)["x"]
    for rate in rates:
        feeds = {"x": x, "sr": np.array(rate, np.int64)}
        expected = dict(zip(block.outputs, run_model(standalone, feeds)))
        with torch.no_grad():
            got = module({k: torch.from_numpy(v) for k, v in feeds.items()})
        for name in block.outputs:
            worst = float(np.abs(got[name].numpy() - expected[name]).max())
            assert worst < 1e-4, f"{make.__name__} sr={rate}: {name} off by {worst:.3g}"
    assert module.ran == {("by_rate", "then_branch"), ("by_rate", "else_branch")} | \
        ({("inner_by_rate", "then_branch"), ("inner_by_rate", "else_branch")} if make is nested_model else set()), \
        module.ran


def _weight_ints(model: onnx.ModelProto, node_name: str, graph: onnx.GraphProto) -> np.ndarray:
    """The integers behind ``node_name``'s weight DequantizeLinear in ``graph``."""
    from onnx import numpy_helper

    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in list(graph.initializer) + list(model.graph.initializer)}
    node = next(n for n in graph.node if n.name == node_name)
    return numpy_helper.to_array(inits[producer[node.input[1]].input[0]])


def test_an_unpinned_if_runs_in_torch_and_its_taken_branch_is_learned(caplog):
    """sr is calibration data (one shared value), not pinned: the If stays. At W4A8 (where rounding
    matters more than the activation steps) the taken branch's Conv is learned: its integers differ
    from round-to-nearest and the block's loss falls, while the branch never taken keeps RTN weights;
    onnxruntime's run of the emitted model agrees with the torch simulation."""
    model = branch_first_model()
    data = {"x": np.random.default_rng(0).standard_normal((CALIB, 8, 8, 8)).astype(np.float32),
            "sr": np.array(16000, np.int64)}
    results = {}
    for method in ("rtn", "flexround"):
        config = onnxflex.QuantConfig(method=method, wbits=4, iters=200, batch_size=16)
        with caplog.at_level("WARNING", logger="onnxflex"):
            results[method] = onnxflex.quantize(model, data, config, progress=False)
    learned, rtn = results["flexround"], results["rtn"]
    (block,) = learned.report["blocks"]
    assert block["runtime"] == "torch" and block["iters"] > 0, block
    assert block["loss_after"] < block["loss_before"], f"loss {block['loss_before']:.4g} -> {block['loss_after']:.4g}"

    def taken(result):
        return _weight_ints(result.model, "conv_16k", _subgraph(result.model, "by_rate", "then_branch"))

    def untaken(result):
        return _weight_ints(result.model, "matmul_8k", _subgraph(result.model, "by_rate", "else_branch"))

    changed = int(np.sum(taken(learned) != taken(rtn)))
    assert changed > 0, "the taken branch's Conv kept its round-to-nearest integers"
    np.testing.assert_array_equal(untaken(learned), untaken(rtn), "the branch never taken moved off RTN")
    assert "'by_rate': else_branch never ran on the calibration data; its layer(s) matmul_8k" in caplog.text
    flow = next(w for w in learned.report["warnings"] if w.startswith("node 'by_rate' (If)"))
    assert "learned in the branch the calibration data takes" in flow and "runs in torch" in flow, flow
    sim = learned.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 30, f"onnxruntime vs simulation {sim:.1f} dB < 30 dB"
    kernels = {l.node: l.kernel for l in check(learned.model).layers}
    assert kernels.get("conv_16k") == "QLinearConv", kernels
    feeds = {"x": np.random.default_rng(7).standard_normal((16, 8, 8, 8)).astype(np.float32),
             "sr": np.array(16000, np.int64)}
    db = sqnr_db(run_model(model, feeds)[0], run_model(learned.model, feeds)[0])
    print(f"unpinned If at W4A8: {changed} of {taken(learned).size} integers moved off RTN, loss "
          f"{block['loss_before']:.4g} -> {block['loss_after']:.4g}, onnxruntime vs simulation {sim:.1f} dB, "
          f"{db:.1f} dB against FP32")
    assert db >= 15, f"SQNR {db:.1f} dB < 15 dB against FP32 at W4A8"
