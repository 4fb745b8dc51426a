"""Bad and unusual models: each gets an exact expectation, an error that names the problem or a
correct quantized model.

Covered elsewhere, not repeated here: a missing model path and a non-protobuf file (test_cli.py), a
model without quantizable layers through the API (test_passes_and_emit.py), empty and duplicate node
names, initializers shared by several nodes and weights fed through Identity/Cast/Transpose
(test_foreign_models.py, the messy_names, duplicate_names, shared_weights and weights_through_ops
graphs).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graphs  # tests/graphs.py; tests/ is on pytest's pythonpath
import onnxflex
from helpers import run_model
from onnxflex.cli import main
from onnxflex.errors import ModelLoadError, OnnxflexError, UnsupportedModelError
from onnxflex.qparams import sqnr_db
from onnxflex.verify import optimized_op_counts

CALIB = 64


def rtn(**changes) -> onnxflex.QuantConfig:
    return onnxflex.QuantConfig(method="rtn", **changes)


def calibration(model: onnx.ModelProto, n: int = CALIB, seed: int = 0) -> dict[str, np.ndarray]:
    return graphs.random_calibration(model, n, seed)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def cli_quantize(tmp_path, model: onnx.ModelProto, *flags):
    """Saves ``model`` and its calibration beside it and runs ``onnxflex quantize`` on them."""
    path, calib, out = tmp_path / "model.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(model, path)
    np.savez(calib, **calibration(model))
    return invoke("quantize", path, "--calib", calib, "--method", "rtn", "--quiet", "-o", out, *flags), out


def assert_one_line_error(result, out, *fragments):
    """Exit code 2, one line on the output naming every fragment, and no output model written."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert not out.exists()


def _conv(b: graphs._Builder, name: str, c_in: int, c_out: int, x: str, y: str) -> str:
    return b.node("Conv", [x, b.conv_weight(f"{name}_w", c_out, c_in, 3), b.small(f"{name}_b", (c_out,))], [y],
                  name=name, pads=[1, 1, 1, 1])


def _graph(nodes, name, inputs=(), outputs=(), inits=()) -> onnx.GraphProto:
    return helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(inits))


def _untyped(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


# --- files that are not ONNX models -------------------------------------------------------------------


def test_directory_instead_of_a_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist or is not a file") as info:
        onnxflex.quantize(tmp_path, None, rtn(), progress=False)
    assert str(tmp_path) in str(info.value)


def test_empty_file_is_not_a_model(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="has no graph nodes; is it an ONNX model"):
        onnxflex.quantize(path, None, rtn(), progress=False)


@pytest.mark.parametrize("keep", [lambda n: 16, lambda n: n // 2, lambda n: n - 1],
                         ids=["16-bytes", "half", "all-but-1-byte"])
def test_truncated_file_is_exit_1_naming_it(tmp_path, keep):
    whole = graphs.conv_bias_add(0).SerializeToString()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(whole[:keep(len(whole))])
    out = tmp_path / "out.onnx"
    result = invoke("quantize", bad, "--quiet", "-o", out)
    assert_one_line_error(result, out, "cut.onnx", "is not a readable ONNX model", "truncated")


def test_file_cut_between_fields_still_names_the_truncation(tmp_path):
    """A cut right after the graph parses (protobuf fields are self-delimiting) but loses opset_import."""
    model = graphs.conv_bias_add(0)
    without = onnx.ModelProto()
    without.CopyFrom(model)
    del without.opset_import[:]
    boundary = len(without.SerializeToString())  # opset_import is serialized last
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(model.SerializeToString()[:boundary])
    with pytest.raises(ModelLoadError, match="cut.onnx' imports no opset; the file is truncated or not ONNX"):
        onnxflex.quantize(bad, calibration(model), rtn(), progress=False)


# --- opsets -------------------------------------------------------------------------------------------


def _with_opset(version: int) -> onnx.ModelProto:
    model = graphs.conv_bias_add(0)
    model.opset_import[0].version = version
    return model


def test_opset_9_is_upgraded_with_a_warning():
    result = onnxflex.quantize(_with_opset(9), calibration(graphs.conv_bias_add(0)), rtn(), progress=False)
    assert any("upgraded the model from opset 9 to 13" in w for w in result.report["warnings"]), \
        result.report["warnings"]
    assert [o.version for o in result.model.opset_import if o.domain == ""] == [13]
    sqnr = min(result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"].values())
    assert sqnr >= 30.0, f"onnxruntime vs simulation {sqnr:.1f} dB after the opset upgrade"


def test_opset_the_version_converter_cannot_upgrade_is_refused_in_one_line():
    b = graphs._Builder(0)
    b.node("BatchNormalization", ["x", *b.bn_params("bn", 3)], ["y"], name="bn0", spatial=0)
    params = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in b.inits]  # IR 3 lists them
    graph = helper.make_graph(b.nodes, "old_bn", [graphs._image(), *params], [graphs._out(graphs.N, 3, 16, 16)],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)
    with pytest.raises(UnsupportedModelError) as info:
        onnxflex.quantize(model, calibration(model), rtn(), progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "opset 6 must be upgraded to 13" in msg and "spatial" in msg, msg


def test_opset_newer_than_onnx_knows_is_refused():
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(UnsupportedModelError, match=f"opset {newest + 5} is newer than the installed onnx knows "
                                                    rf"\({newest}\); upgrade the onnx package"):
        onnxflex.quantize(_with_opset(newest + 5), calibration(graphs.conv_bias_add(0)), rtn(), progress=False)


# --- custom-domain ops --------------------------------------------------------------------------------


def custom_op_model(domain: str, op_type: str) -> onnx.ModelProto:
    """Conv → ``domain``:``op_type`` (one float input, one output) → Conv."""
    b = graphs._Builder(0)
    _conv(b, "conv1", 3, 8, "x", "a")
    b.nodes.append(helper.make_node(op_type, ["a"], ["g"], name="custom", domain=domain))
    _conv(b, "conv2", 8, 8, "g", "y")
    graph = _graph(b.nodes, "custom", [graphs._image()], [graphs._out(graphs.N, 8, 16, 16)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(domain, 1)])
    model.ir_version = 8
    return model


def test_custom_op_onnxruntime_runs_stays_float_in_an_onnxruntime_block(caplog):
    model = custom_op_model("com.microsoft", "Gelu")
    with caplog.at_level("WARNING", logger="onnxflex"):
        result = onnxflex.quantize(model, calibration(model), rtn(), progress=False)
    assert "Gelu (node 'custom')" in caplog.text
    onnx.checker.check_model(result.model, full_check=True)
    assert [n.op_type for n in result.model.graph.node].count("Conv") == 2
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 40, f"onnxruntime vs simulation {sim:.1f} dB < 40 dB"
    feeds = calibration(model, 16, seed=7)
    db = sqnr_db(run_model(model, feeds)[0], run_model(result.model, feeds)[0])
    assert db >= 25, f"SQNR {db:.1f} dB < 25 dB against FP32"


def test_custom_op_onnxruntime_cannot_run_names_op_domain_and_node(tmp_path):
    model = custom_op_model("vendor.ops", "FancyAct")
    with pytest.raises(UnsupportedModelError) as info:
        onnxflex.quantize(model, calibration(model), rtn(), progress=False)
    assert "FancyAct (domain 'vendor.ops', node 'custom')" in str(info.value)
    result, out = cli_quantize(tmp_path, model)
    assert_one_line_error(result, out, "FancyAct", "vendor.ops", "standard ONNX ops")


# --- control flow -------------------------------------------------------------------------------------


def if_model() -> onnx.ModelProto:
    """conv1 → conv2; If(sum(conv2) > 0): then a Conv of conv1's output with an outer weight, else
    conv1 + conv2 (both branches read outer tensors) → conv3."""
    b = graphs._Builder(0)
    _conv(b, "conv1", 3, 8, "x", "a")
    _conv(b, "conv2", 8, 8, "a", "b")
    b.node("ReduceSum", ["b"], ["s"], name="sum", keepdims=0)
    b.node("Greater", ["s", b.const("zero", np.array(0.0, np.float32))], ["cond"], name="positive")
    inner_w = b.conv_weight("inner_w", 8, 8, 3)
    then_g = _graph([helper.make_node("Conv", ["a", inner_w], ["t"], name="inner_conv", pads=[1, 1, 1, 1])],
                    "then", outputs=[_untyped("t")])
    else_g = _graph([helper.make_node("Add", ["a", "b"], ["e"], name="inner_add")], "else", outputs=[_untyped("e")])
    b.node("If", ["cond"], ["g"], name="branch", then_branch=then_g, else_branch=else_g)
    _conv(b, "conv3", 8, 8, "g", "y")
    return b.model("if_model", [graphs._image()], [graphs._out(graphs.N, 8, 16, 16)], opset=13)


def loop_model() -> onnx.ModelProto:
    """conv1 → conv2; Loop 3 times v = (v + conv1 output) · half, v starting at conv2's output (the
    body reads an outer run-time tensor and an outer initializer) → conv3."""
    b = graphs._Builder(0)
    _conv(b, "conv1", 3, 8, "x", "a")
    _conv(b, "conv2", 8, 8, "a", "b")
    half = b.const("half", np.array(0.5, np.float32))
    body = _graph([helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
                   helper.make_node("Add", ["v_in", "a"], ["v_sum"], name="accumulate"),
                   helper.make_node("Mul", ["v_sum", half], ["v_out"], name="halve")], "body",
                  inputs=[helper.make_tensor_value_info("i", TensorProto.INT64, []),
                          helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _untyped("v_in")],
                  outputs=[helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _untyped("v_out")])
    trips, go = b.const("trips", np.array(3, np.int64)), b.const("go", np.array(True))
    b.node("Loop", [trips, go, "b"], ["g"], name="repeat", body=body)
    _conv(b, "conv3", 8, 8, "g", "y")
    return b.model("loop_model", [graphs._image()], [graphs._out(graphs.N, 8, 16, 16)], opset=13)


def scan_model() -> onnx.ModelProto:
    """conv1 → conv2; Scan over conv2's channels adding the channel mean of conv1's output to each
    channel (an outer run-time read) → conv3."""
    b = graphs._Builder(0)
    _conv(b, "conv1", 3, 8, "x", "a")
    _conv(b, "conv2", 8, 8, "a", "b")
    body = _graph([helper.make_node("ReduceMean", ["a"], ["mean"], name="channel_mean", axes=[1], keepdims=0),
                   helper.make_node("Add", ["plane", "mean"], ["shifted"], name="shift")], "body",
                  inputs=[_untyped("plane")], outputs=[_untyped("shifted")])
    b.node("Scan", ["b"], ["g"], name="per_channel", body=body, num_scan_inputs=1, scan_input_axes=[1],
           scan_output_axes=[1])
    _conv(b, "conv3", 8, 8, "g", "y")
    return b.model("scan_model", [graphs._image()], [graphs._out(graphs.N, 8, 16, 16)], opset=13)


def _subgraph_ops(model: onnx.ModelProto) -> list[str]:
    ops = []
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops += [n.op_type for n in attr.g.node]
    return ops


def test_a_weighted_node_left_float_inside_a_branch_is_named():
    """--exclude-node on the If's inner Conv keeps it float, and the If's warning says a weighted node
    inside stays in float (a branch with none gets no warning: see the Loop and Scan cases below)."""
    model = if_model()
    result = onnxflex.quantize(model, calibration(model), rtn(exclude_nodes=("inner_conv",)), progress=False)
    expected = ("node 'branch' (If) has subgraphs (else_branch, then_branch); its 1 Conv/Gemm/MatMul/recurrent "
                "node(s) inside (of 3) stay in float")
    assert any(w.startswith(expected) for w in result.report["warnings"]), result.report["warnings"]


@pytest.mark.parametrize("build, node, op, attrs, inner", [
    (if_model, "branch", "If", "else_branch, then_branch", 3),
    (loop_model, "repeat", "Loop", "body", 3),
    (scan_model, "per_channel", "Scan", "body", 2),
], ids=["If", "Loop", "Scan"])
def test_control_flow_quantizes_its_layers_in_place_and_the_rest(caplog, build, node, op, attrs, inner):
    """The If's then branch holds a Conv (quantized inside the branch, its block run in torch, and a
    warning says so); the Loop and Scan bodies hold no weighted node and stay float with no warning
    about them. The outer Convs are integer kernels either way."""
    model = build()
    with caplog.at_level("WARNING", logger="onnxflex"):
        result = onnxflex.quantize(model, calibration(model), rtn(latency_rules=False),  # every outer Conv integer
                                   progress=False)
    head = f"node {node!r} ({op}) has subgraphs ({attrs}); "
    if op == "If":
        expected = head + "1 layer(s) inside (inner_conv) get int8 weights, learned in the branch the calibration data takes"
        assert any(w.startswith(expected) for w in result.report["warnings"]), result.report["warnings"]
        assert expected in caplog.text
    else:
        assert not any(head in w for w in result.report["warnings"]), result.report["warnings"]
    qmodel = result.model
    onnx.checker.check_model(qmodel, full_check=True)
    inside = _subgraph_ops(qmodel)
    if op == "If":
        assert inside.count("DequantizeLinear") >= 1 and "Conv" in inside, inside
    else:
        assert len(inside) == inner and not {"QuantizeLinear", "DequantizeLinear"} & set(inside), inside
    counts = optimized_op_counts(qmodel)
    assert counts.get("QLinearConv", 0) >= 3 and "Conv" not in counts, f"Convs not integer: {counts}"
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 40, f"{op}: onnxruntime vs simulation {sim:.1f} dB < 40 dB"
    feeds = calibration(model, 16, seed=7)
    db = sqnr_db(run_model(model, feeds)[0], run_model(qmodel, feeds)[0])
    assert db >= 25, f"{op}: SQNR {db:.1f} dB < 25 dB against FP32"


# --- nothing to quantize ------------------------------------------------------------------------------


def test_no_quantizable_layer_is_exit_1(tmp_path):
    b = graphs._Builder(0)
    b.node("Relu", ["x"], ["r"])
    b.node("MatMul", ["r", "r"], ["y"])  # no constant weight: nothing to quantize
    model = b.model("no_layers", [graphs._vector(features=4)], [graphs._out(graphs.N, 4)], opset=13)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 4
    result, out = cli_quantize(tmp_path, model)
    assert_one_line_error(result, out, "no quantizable layer", "nothing to quantize")


# --- already-quantized models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qdq_model():
    """conv_bias_add quantized once by onnxflex (RTN, min/max weight steps), with its float original."""
    fp = graphs.conv_bias_add(0)
    result = onnxflex.quantize(fp, calibration(fp), rtn(weight_scale="minmax", latency_rules=False), progress=False)
    return fp, result


def _weight_ints(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Weight integers of each weighted node, keyed by node name."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    return {n.name: numpy_helper.to_array(inits[producers[n.input[1]].input[0]])
            for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}


def test_qdq_model_is_refused_naming_its_nodes(tmp_path, qdq_model):
    fp, first = qdq_model
    with pytest.raises(UnsupportedModelError) as info:
        onnxflex.quantize(first.model, calibration(fp), rtn(), progress=False)
    msg = str(info.value)
    count = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in first.model.graph.node)
    assert f"already quantized: it has {count} QuantizeLinear/DequantizeLinear node(s)" in msg
    assert "'w1_DequantizeLinear'" in msg and "--requantize" in msg
    result, out = cli_quantize(tmp_path, first.model)
    assert_one_line_error(result, out, "already quantized", "--requantize")


def test_requantize_recovers_the_float_model_and_quantizes_afresh(qdq_model):
    """Requantizing with the same RTN min/max settings finds exactly the first run's weight integers:
    the dequantized weights lie on the grid, and their max |w| is 127 steps."""
    fp, first = qdq_model
    again = onnxflex.quantize(first.model, calibration(fp), rtn(weight_scale="minmax", requantize=True,
                                                                 latency_rules=False), progress=False)
    assert any(w.startswith("requantize: dropped ") for w in again.report["warnings"]), again.report["warnings"]
    onnx.checker.check_model(again.model, full_check=True)

    def qdq_ops(m):
        return sorted(n.op_type for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))

    assert qdq_ops(again.model) == qdq_ops(first.model)
    before, after = _weight_ints(first.model), _weight_ints(again.model)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=f"weight integers of {name} changed")
    assert again.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"] >= 40
    feeds = calibration(fp, 32, seed=7)
    db = sqnr_db(run_model(first.model, feeds)[0], run_model(again.model, feeds)[0])
    assert db >= 30, f"requantized model differs from the first quantization by SQNR {db:.1f} dB"


def test_operator_form_model_is_refused_even_with_requantize():
    b = graphs._Builder(0)
    b.node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq_input")
    w = b.const("w", np.ones((8, 4), np.uint8))
    b.node("MatMulInteger", ["xq", w, "xz"], ["acc"], name="int_matmul")
    b.node("Cast", ["acc"], ["y"], name="to_float", to=TensorProto.FLOAT)
    model = b.model("operator_form", [graphs._vector(features=8)], [graphs._out(graphs.N, 4)], opset=13)
    with pytest.raises(UnsupportedModelError, match=r"already quantized in operator form \(DynamicQuantizeLinear "
                                                    r"node\(s\) 'dq_input', 'int_matmul'\)"):
        onnxflex.quantize(model, calibration(model), rtn(requantize=True), progress=False)


def test_requantize_refuses_a_quantize_linear_feeding_integers_onward():
    """A QuantizeLinear whose integers a non-DequantizeLinear node reads is no Q/DQ pair to undo."""
    b = graphs._Builder(0)
    scale, zp = b.const("s", np.array(0.1, np.float32)), b.const("z", np.array(0, np.uint8))
    b.node("QuantizeLinear", ["x", scale, zp], ["xq"], name="quantize_input")
    b.node("Cast", ["xq"], ["xf"], name="raw_integers", to=TensorProto.FLOAT)
    b.node("Gemm", ["xf", b.he("w", (4, 8), 8)], ["y"], name="fc", transB=1)
    model = b.model("q_without_dq", [graphs._vector(features=8)], [graphs._out(graphs.N, 4)], opset=13)
    with pytest.raises(UnsupportedModelError, match=r"QuantizeLinear 'quantize_input' feeds node 'raw_integers' "
                                                    r"\(Cast\) with integers"):
        onnxflex.quantize(model, calibration(model), rtn(requantize=True), progress=False)


def test_requantize_must_be_a_bool():
    with pytest.raises(OnnxflexError, match="requantize='yes' must be true or false"):
        rtn(requantize="yes")


# --- dynamic shapes -----------------------------------------------------------------------------------


def dynamic_model() -> onnx.ModelProto:
    """Every input and output dimension symbolic, no value_info, and a head that reshapes with a shape
    computed at run time: Conv → Relu → Conv(stride 2) → Relu → GlobalAveragePool →
    Reshape(x, concat(Shape(x)[:1], [-1])) → Gemm."""
    b = graphs._Builder(0)
    _conv(b, "conv1", 3, 8, "x", "c1")
    b.node("Relu", ["c1"], ["r1"], name="relu1")
    b.node("Conv", ["r1", b.conv_weight("conv2_w", 16, 8, 3), b.small("conv2_b", (16,))], ["c2"], name="conv2",
           pads=[1, 1, 1, 1], strides=[2, 2])
    b.node("Relu", ["c2"], ["r2"], name="relu2")
    b.node("GlobalAveragePool", ["r2"], ["gap"], name="pool")
    b.node("Shape", ["gap"], ["gap_shape"], name="shape")
    b.node("Slice", ["gap_shape", b.const("start", np.array([0], np.int64)), b.const("stop", np.array([1], np.int64))],
           ["batch"], name="batch")
    b.node("Concat", ["batch", b.const("rest", np.array([-1], np.int64))], ["flat_shape"], name="flat_shape", axis=0)
    b.node("Reshape", ["gap", "flat_shape"], ["flat"], name="flatten")
    b.node("Gemm", ["flat", b.he("fc_w", (10, 16), 16), b.small("fc_b", (10,))], ["y"], name="fc", transB=1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "channels", "height", "width"])
    return b.model("dynamic", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "classes"])],
                   opset=13)


def test_dynamic_shapes_everywhere_quantize_and_keep_them():
    model = dynamic_model()
    calib = {"x": np.random.default_rng(0).standard_normal((CALIB, 3, 16, 16)).astype(np.float32)}
    result = onnxflex.quantize(model, calib, rtn(), progress=False)
    qmodel = result.model
    onnx.checker.check_model(qmodel, full_check=True)
    dims = [d.dim_param for d in qmodel.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "channels", "height", "width"], f"input dims changed to {dims}"
    assert result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"] >= 40
    rng = np.random.default_rng(5)
    for batch, size in ((1, 16), (3, 12), (2, 24)):  # sizes the calibration never had
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        db = sqnr_db(run_model(model, {"x": x})[0], run_model(qmodel, {"x": x})[0])
        assert db >= 25, f"SQNR {db:.1f} dB < 25 dB at batch {batch}, {size}x{size}"
