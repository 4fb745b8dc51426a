"""`onnxflex check`: hand-made QDQ models that break one rule each fail with the node and the rule named;
the same model with every rule kept passes. The models are a Conv with a residual Add and a Concat."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxflex.check import check, format_report
from onnxflex.cli import main

RNG = np.random.default_rng(0)
W = RNG.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8)


def qdq_model(*, act_dtype=TensorProto.INT8, act_zp=0, act_scale=(0.05,), input_qdq=True, weight_dq=True,
              weight_dtype=TensorProto.INT8, weight_axis=0, weight_zp=0, bias="float", output_q=False,
              skip_qdq=True, concat_scales=(0.05, 0.05), opset=13) -> onnx.ModelProto:
    """x → Q/DQ → Conv(weight DQ, bias) → Add(skip) → Relu → Concat(with another Q/DQ of x) → y.

    The defaults follow every TensorRT rule; each keyword breaks one of them."""
    np_act = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}[act_dtype]
    inits, nodes = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def qdq(src, name, scale):
        s = const(f"{name}_s", np.array(scale if len(scale) > 1 else scale[0], np.float32))
        z = const(f"{name}_z", np.full(np.shape(scale) if len(scale) > 1 else (), act_zp, np_act))
        nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [f"{name}_q"], name=f"{name}_Q", axis=1))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [f"{name}_dq"], name=f"{name}_DQ",
                                      axis=1))
        return f"{name}_dq"

    x_in = qdq("x", "x", act_scale) if input_qdq else "x"
    if weight_dq:
        np_w = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}[weight_dtype]
        ints = const("w_int", W.astype(np_w))
        scale = const("w_s", np.full(4, 0.01, np.float32))
        zp = const("w_z", np.full(4, weight_zp, np_w))
        nodes.append(helper.make_node("DequantizeLinear", [ints, scale, zp], ["w"], name="w_DQ", axis=weight_axis))
    else:
        const("w", W.astype(np.float32) * 0.01)
    b = const("b", RNG.standard_normal(4).astype(np.float32) * 0.1)
    if bias == "int32":
        const("b_int", np.round(RNG.standard_normal(4) * 100).astype(np.int32))
        const("b_s", np.full(4, 0.0005, np.float32))
        nodes.append(helper.make_node("DequantizeLinear", ["b_int", "b_s"], ["b_dq"], name="b_DQ", axis=0))
        b = "b_dq"
    nodes.append(helper.make_node("Conv", [x_in, "w", b], ["c"], name="conv", pads=[1, 1, 1, 1]))
    c = qdq("c", "c", act_scale) if output_q else "c"
    skip = qdq("x", "skip", act_scale) if skip_qdq else "x"
    nodes.append(helper.make_node("Add", [c, skip], ["a"], name="add"))
    nodes.append(helper.make_node("Relu", ["a"], ["r"], name="relu"))
    left = qdq("r", "left", concat_scales[:1])
    right = qdq("x", "right", concat_scales[1:])
    nodes.append(helper.make_node("Concat", [left, right], ["y"], name="concat", axis=1))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for(model.opset_import)
    return model


def test_a_model_that_keeps_every_tensorrt_rule_passes():
    model = qdq_model()
    onnx.checker.check_model(model, full_check=True)
    report = check(model, "tensorrt")
    assert report.ok and not report.findings, format_report(report)
    assert [(l.node, l.integer) for l in report.layers] == [("conv", True)]
    assert any("TensorRT engine check not run" in line for line in report.not_verified), report.not_verified


# keyword that breaks one rule → (node named in the finding, rule)
VIOLATIONS = {
    "missing input Q/DQ": (dict(input_qdq=False), "conv", "input-qdq"),
    "float weight": (dict(weight_dq=False), "conv", "weight-qdq"),
    "uint8 weight": (dict(weight_dtype=TensorProto.UINT8), "conv", "weight-dtype"),
    "weight on the wrong axis": (dict(weight_axis=1), "conv", "weight-axis"),
    "asymmetric weight": (dict(weight_zp=3), "conv", "zero-point"),
    "asymmetric activation": (dict(act_zp=5), "conv", "zero-point"),
    "uint8 activation": (dict(act_dtype=TensorProto.UINT8), "conv", "act-dtype"),
    "per-channel activation": (dict(act_scale=(0.05, 0.04, 0.05, 0.05)), "conv", "act-axis"),
    "DQ on the bias": (dict(bias="int32"), "conv", "bias"),
    "residual Add without Q/DQ": (dict(skip_qdq=False), "add", "residual-add"),
    "Concat inputs with two steps": (dict(concat_scales=(0.05, 0.07)), "concat", "concat-scales"),
    "opset TensorRT does not read": (dict(opset=23), "(model)", "opset"),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_each_tensorrt_rule_violation_fails_naming_node_and_rule(case):
    changes, node, rule = VIOLATIONS[case]
    report = check(qdq_model(**changes), "tensorrt")
    hits = [f for f in report.fallbacks if f.node == node and f.rule == rule]
    assert not report.ok and hits, f"{case}: expected a {rule} fallback at {node}\n{format_report(report)}"
    text = format_report(report)
    assert f"{node}" in text and f"[{rule}]" in text and "result: FAIL" in text


def test_quantized_weighted_op_output_is_a_warning_not_a_fallback():
    report = check(qdq_model(output_q=True), "tensorrt")
    assert report.ok, format_report(report)
    assert [(f.node, f.rule, f.fallback) for f in report.findings] == [("conv", "output-q", False)]


def test_cli_check_exit_codes_and_messages(tmp_path):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(qdq_model(), str(good))
    onnx.save(qdq_model(bias="int32", act_zp=5), str(bad))
    runner = CliRunner()
    ok = runner.invoke(main, ["check", str(good), "--target", "tensorrt"])
    assert ok.exit_code == 0, ok.output
    assert "result: OK" in ok.output
    assert sum("engine check not run" in line for line in ok.output.splitlines()) == 1, ok.output
    fail = runner.invoke(main, ["check", str(bad), "--target", "tensorrt"])
    assert fail.exit_code == 1, fail.output
    assert "conv (Conv)  [bias]" in fail.output and "[zero-point]" in fail.output, fail.output
    as_json = runner.invoke(main, ["check", str(bad), "--target", "tensorrt", "--json", "--static-only"])
    assert as_json.exit_code == 1 and '"ok": false' in as_json.output


def test_onnxruntime_check_reads_the_optimized_graph():
    """The TensorRT-style model (int8 symmetric, float bias, no output Q) is valid QDQ, but onnxruntime
    cannot fuse its Conv: the check says so from the optimized graph, not only from the rules."""
    report = check(qdq_model(), "onnxruntime")
    assert not report.ok
    assert report.runtime_ops, "onnxruntime's optimized graph was not read"
    kernel = {l.node: l.kernel for l in report.layers}["conv"]
    assert kernel in ("Conv", "FusedConv"), report.layers
    assert any(f.rule == "runtime-kernel" and f.node == "conv" for f in report.fallbacks), format_report(report)


def test_onnxruntime_check_passes_a_fusable_model():
    model = qdq_model(act_dtype=TensorProto.UINT8, act_zp=128, bias="int32", output_q=True)
    report = check(model, "onnxruntime")
    assert report.ok, format_report(report)
    assert {l.node: l.kernel for l in report.layers}["conv"] == "QLinearConv", report.layers


def blocked_int4_model(op: str = "MatMul", axis: int = 0, block: int = 16, k: int = 32, n: int = 32):
    """Weight-only 4-bit: x (float) → op(x, DequantizeLinear(INT4 weight, blocked on ``axis``)); opset 21."""
    vals = np.random.default_rng(1).integers(-8, 8, (k, n))
    shape = [k // block, n] if axis == 0 else [k, n // block]
    inits = [helper.make_tensor("w_int", TensorProto.INT4, [k, n], vals.ravel().tolist()),
             numpy_helper.from_array(np.full(shape, 0.01, np.float32), "w_s")]
    nodes = [helper.make_node("DequantizeLinear", ["w_int", "w_s"], ["w"], name="w_DQ", axis=axis, block_size=block),
             helper.make_node(op, ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_blocked_int4_weight_only_runs_on_both_targets(op):
    trt = check(blocked_int4_model(op), "tensorrt")
    assert trt.ok, format_report(trt)
    ort = check(blocked_int4_model(op), "onnxruntime")
    assert ort.ok and ort.runtime_ops.get("MatMulNBits") == 1, format_report(ort)


def test_int4_blocked_on_the_output_axis_falls_back_on_both_targets():
    for target in ("tensorrt", "onnxruntime"):
        report = check(blocked_int4_model(axis=1), target)
        assert [f.rule for f in report.fallbacks if f.node == "mm"][:1] == ["weight-axis"], format_report(report)
    ort = check(blocked_int4_model(axis=1), "onnxruntime")
    assert {l.node: l.kernel for l in ort.layers}["mm"] == "MatMul", "onnxruntime agrees: a float MatMul"
