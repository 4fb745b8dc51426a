"""The latency rule: shallow weighted layers (few products per output) stay float on onnxruntime.

Tiny models written as ONNX text; quantized with rtn (nothing learned) so each run takes a second.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from click.testing import CliRunner
from onnx import helper

import onnxflex
from helpers import run_model
from onnxflex.check import check, format_report
from onnxflex.cli import main
from onnxflex.config import QuantConfig
from onnxflex.options import resolve
from onnxflex.placement import reduction_depth
from onnxflex.planning import build_plan
from onnxflex.report import timeless
from onnxflex.speed import predicted_ratio


def _weights(rng, **shapes) -> list[onnx.TensorProto]:
    return [onnx.numpy_helper.from_array((rng.standard_normal(s) * (2.0 / np.prod(s[1:])) ** 0.5)
                                         .astype(np.float32), name) for name, s in shapes.items()]


def _model(text: str, **shapes) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for node in model.graph.node:
        node.name = node.output[0]
    model.graph.initializer.extend(_weights(np.random.default_rng(0), **shapes))
    onnx.checker.check_model(model, full_check=True)
    return model


HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

# A (3x3 over 16 channels, depth 144) → Relu → B depthwise (depth 9) → Sigmoid → C (1x1 over 32, depth 32)
DEPTHWISE = HEADER + """
net (float[N, 16, 12, 12] x) => (float[N, 32, 12, 12] y) {
    a = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, wa)
    ra = Relu (a)
    b = Conv <group = 32, pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (ra, wb)
    sb = Sigmoid (b)
    y = Conv <kernel_shape = [1, 1]> (sb, wc)
}"""
DEPTHWISE_WEIGHTS = dict(wa=(32, 16, 3, 3), wb=(32, 1, 3, 3), wc=(32, 32, 1, 1))

# S1 (1 input channel, depth 9) → Relu → S2 depthwise (depth 9) → Relu → C (depth 144): every shallow layer
# is read only by an integer layer, so both stay integer (S1 only once S2 does)
SHALLOW_INTO_INTEGER = HEADER + """
net (float[N, 1, 12, 12] x) => (float[N, 16, 12, 12] y) {
    s1 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w1)
    r1 = Relu (s1)
    s2 = Conv <group = 16, pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (r1, w2)
    r2 = Relu (s2)
    y = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (r2, w3)
}"""
SHALLOW_WEIGHTS = dict(w1=(16, 1, 3, 3), w2=(16, 1, 3, 3), w3=(16, 16, 3, 3))


def _plan(model, **options):
    return build_plan(model, resolve(QuantConfig(**options)).plan)


def _data(model, n=48, seed=1):
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _quantize(model, **options):
    config = QuantConfig(method="rtn", verify_samples=12, **options)
    return onnxflex.quantize(model, _data(model), config, progress=False)


@pytest.mark.parametrize("op, shape, attrs, depth", [
    ("Conv", (16, 1, 3, 3), {}, 9),                      # one input channel
    ("Conv", (32, 1, 3, 3), {"group": 32}, 9),           # depthwise
    ("Conv", (16, 8, 1, 1), {}, 8),                      # 1x1 over 8 channels
    ("Conv", (16, 16, 3, 3), {}, 144),
    ("ConvTranspose", (8, 4, 2, 2), {}, 32),             # [C, M/g, kh, kw]: C/g · kh · kw
    ("ConvTranspose", (8, 4, 2, 2), {"group": 2}, 16),
    ("MatMul", (24, 64), {}, 24),                        # [K, N]
    ("Gemm", (64, 24), {"transB": 1}, 24),               # [N, K]
    ("Gemm", (24, 64), {}, 24),
])
def test_reduction_depth_per_op(op, shape, attrs, depth):
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    assert reduction_depth(node, shape) == depth


def test_depthwise_conv_stays_float_and_the_model_runs():
    model = _model(DEPTHWISE, **DEPTHWISE_WEIGHTS)
    plan = _plan(model)
    layers = [layer.node for layer in plan.layers]
    floats = {node: depth for node, _, depth in plan.latency_floats}
    assert floats == {"b": 9}, plan.latency_floats
    assert layers == ["a", "y"], layers  # C (depth 32, not below 32) stays integer
    result = _quantize(model)
    weight_dq = {n.output[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in {t.name for t in result.model.graph.initializer}}
    conv_b = next(n for n in result.model.graph.node if n.op_type == "Conv" and n.input[1] == "wb")
    assert conv_b.input[1] not in weight_dq, "the depthwise conv's weight is dequantized: it was quantized"
    feeds = _data(model, n=4, seed=7)
    (out,) = run_model(result.model, feeds)
    (ref,) = run_model(model, feeds)
    sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))
    assert sqnr >= 25.0, f"SQNR {sqnr:.1f} dB < 25 dB with the depthwise conv float"
    assert result.report["verification"]["quantized_vs_fp32_sqnr_db"]["y"] >= 25.0


def test_shallow_conv_read_only_by_integer_layers_stays_integer():
    model = _model(SHALLOW_INTO_INTEGER, **SHALLOW_WEIGHTS)
    plan = _plan(model)
    assert plan.latency_floats == (), plan.latency_floats
    assert [layer.node for layer in plan.layers] == ["s1", "s2", "y"]


def test_no_latency_rules_quantizes_all_and_weight_only_ignores_the_rule():
    model = _model(DEPTHWISE, **DEPTHWISE_WEIGHTS)
    assert [l.node for l in _plan(model, latency_rules=False).layers] == ["a", "b", "y"]
    assert [l.node for l in _plan(model, abits=0).layers] == ["a", "b", "y"]  # no activation Q/DQ to save


def test_cli_no_latency_rules_flag(tmp_path):
    model = _model(DEPTHWISE, **DEPTHWISE_WEIGHTS)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **_data(model, n=8))
    for flag, kept in (("--latency-rules", "b (9)"), ("--no-latency-rules", None)):
        result = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx"), flag], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert (kept in result.output) if kept else ("latency rule" not in result.output), result.output


def test_tensorrt_target_ignores_the_rule():
    model = _model(DEPTHWISE, **DEPTHWISE_WEIGHTS)
    plan = _plan(model, target="tensorrt")
    assert plan.latency_floats == ()
    assert [layer.node for layer in plan.layers] == ["a", "b", "y"]


def test_cost_model_predicts_the_rule_pays():
    model = _model(DEPTHWISE, **DEPTHWISE_WEIGHTS)
    feed = _data(model, n=4)
    with_rule = predicted_ratio(_plan(model), feed)
    without = predicted_ratio(_plan(model, latency_rules=False), feed)
    assert with_rule is not None and without is not None
    assert with_rule < without, f"predicted {with_rule} with the rule, {without} without"
    assert 0.3 < with_rule < 1.0, with_rule


def test_report_section_is_deterministic_and_check_shows_latency_float():
    model = _model(DEPTHWISE, **DEPTHWISE_WEIGHTS)
    first, second = _quantize(model), _quantize(model)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert timeless(first.report) == timeless(second.report)
    section = first.report["latency_rules"]
    assert section["enabled"] is True and section["float_depth"] == 32
    assert section["kept_float"] == [{"node": "b", "op_type": "Conv", "depth": 9}]
    assert isinstance(section["predicted_ratio_vs_fp32"], float), section
    measured = section["measured_ratio_vs_fp32"]
    assert isinstance(measured, float) and measured > 0, section
    assert section["measured"]["rounds"] >= 5 and section["measured"]["batch"] == 12
    assert first.report["config"]["latency_rules"] is True
    assert "exclude_nodes" in first.report["config"] and first.report["config"]["exclude_nodes"] == []

    report = check(first.model)
    assert report.ok, format_report(report)
    found = [f for f in report.findings if f.node == "b"]
    assert [(f.rule, f.fallback) for f in found] == [("latency-float", False)], found
    assert "9 products" in found[0].message
    status = {layer.node: layer.integer for layer in report.layers}
    assert status["b"] is False and status["a"] is True
    assert "latency-float" in format_report(report) and "1 float by the latency rule" in format_report(report)


def test_check_still_fails_a_deep_float_layer():
    model = _model(DEPTHWISE, **DEPTHWISE_WEIGHTS)
    result = _quantize(model, exclude_nodes=("a",))  # depth 144 kept float by hand: not the latency rule
    report = check(result.model)
    assert not report.ok
    assert {f.node for f in report.fallbacks} == {"a"}, format_report(report)
    assert "b" in {f.node for f in report.findings if f.rule == "latency-float"}


def test_a_model_of_only_shallow_layers_stays_integer_with_a_warning():
    model = _model(HEADER + """
net (float[N, 8, 12, 12] x) => (float[N, 8, 12, 12] y) {
    d = Conv <group = 8, pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, wd)
    y = Sigmoid (d)
}""", wd=(8, 1, 3, 3))
    plan = _plan(model)
    assert [layer.node for layer in plan.layers] == ["d"] and plan.latency_floats == ()
    assert any("would keep every one of the 1 layers float" in w for w in plan.warnings), plan.warnings


def test_a_model_whose_weights_exceed_the_memory_bound_is_not_timed(monkeypatch):
    """Timing holds the whole FP32 model in an onnxruntime session: a model whose float weights exceed
    --max-cache-mb (the run's memory bound) is not timed, and the section says why."""
    from onnxflex import stages

    model = _model(DEPTHWISE, **DEPTHWISE_WEIGHTS)
    weights = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert stages.float_weight_bytes(model) == weights > 0
    timed = _quantize(model).report["latency_rules"]
    assert isinstance(timed["measured_ratio_vs_fp32"], float)
    monkeypatch.setattr(stages, "float_weight_bytes", lambda m: (2 << 30) + 1)
    section = _quantize(model, max_cache_mb=2048).report["latency_rules"]
    assert section["measured_ratio_vs_fp32"] is None
    assert "exceed the memory bound --max-cache-mb 2048" in section["measured"]["skipped"], section
