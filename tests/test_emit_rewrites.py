"""The onnxruntime emitter's rewrites: a SiLU between integer layers written as QuickGelu (``silu``), a
Softmax along an early axis of a Transpose run before it (``softmax``), a quantized Concat's float
inputs quantized on its step (``concat``).

Tiny models written as ONNX text; quantized with rtn (nothing learned) so each run takes a second.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx.parser

import onnxflex
from helpers import run_model
from onnxflex.check import check, format_report
from onnxflex.config import QuantConfig
from onnxflex.emit import STAGES, emit
from onnxflex.options import resolve
from onnxflex.ort import session, session_options
from onnxflex.planning import build_plan
from onnxflex.runtimes.onnxruntime import ONNXRUNTIME
from onnxflex.runtimes.tensorrt import TENSORRT

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

# A (3x3 over 16 channels) → SiLU → B (3x3 over 32) → SiLU (the graph output's producer, y read as is)
SILU = HEADER + """
net (float[N, 16, 10, 10] x) => (float[N, 16, 10, 10] y) {
    a = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, wa)
    sa = Sigmoid (a)
    ma = Mul (a, sa)
    b = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (ma, wb)
    sb = Sigmoid (b)
    y = Mul (sb, b)
}"""
WEIGHTS = dict(wa=(32, 16, 3, 3), wb=(16, 32, 3, 3))


def _model(text: str = SILU, **shapes) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for node in model.graph.node:
        node.name = node.output[0]
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array((rng.standard_normal(s) * (2.0 / np.prod(s[1:])) ** 0.5).astype(np.float32), n)
        for n, s in (shapes or WEIGHTS).items())
    onnx.checker.check_model(model, full_check=True)
    return model


def _data(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 16, 10, 10)).astype(np.float32)}


def _quantize(model, **options):
    return onnxflex.quantize(model, _data(32), QuantConfig(method="rtn", verify_samples=8, **options), progress=False)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / max(np.sum((ref - out) ** 2), 1e-30)))


def test_silu_after_an_integer_conv_is_one_quickgelu_reading_the_dequantized_output():
    result = _quantize(_model())
    g = result.model.graph
    fused = [n for n in g.node if n.op_type == "QuickGelu"]
    assert len(fused) == 2 and "Sigmoid" not in _ops(result.model), _ops(result.model)
    producer = {o: n for n in g.node for o in n.output}
    for node in fused:
        assert node.domain == "com.microsoft" and onnx.helper.get_attribute_value(node.attribute[0]) == 1.0
        assert producer[node.input[0]].op_type == "DequantizeLinear", node
    assert [n.name for n in fused] == ["ma", "y"] and fused[1].output[0] == "y"  # the Mul's name and output
    assert any(o.domain == "com.microsoft" for o in result.model.opset_import)
    onnx.checker.check_model(result.model, full_check=True)
    report = check(result.model)
    assert report.ok, format_report(report)
    assert result.report["verification"]["quantized_vs_fp32_sqnr_db"]["y"] >= 25.0, result.report["verification"]


def test_onnxruntime_runs_the_fused_silu_on_one_dequantized_copy(tmp_path):
    result = _quantize(_model())
    path = tmp_path / "optimized.onnx"
    session(result.model, ["CPUExecutionProvider"], threads=1, opts=session_options(optimized_path=str(path)))
    ops = _ops(onnx.load(path))
    # unfused, onnxruntime copies each SiLU's DequantizeLinear for its Sigmoid and its Mul (four in all)
    assert ops.count("QuickGelu") == 2 and "Sigmoid" not in ops and "Mul" not in ops, ops
    assert ops.count("DequantizeLinear") == 2 and ops.count("QLinearConv") == 2, ops


def test_fused_emission_matches_the_two_op_emission():
    model = _model()
    result = _quantize(model)
    canonical = build_plan(model, resolve(QuantConfig(method="rtn")).plan).model
    unfused = emit(canonical, result.params, dataclasses.replace(ONNXRUNTIME, fuse_silu=False))
    assert _ops(unfused).count("Sigmoid") == 2 and "QuickGelu" not in _ops(unfused)
    feeds = _data(8, seed=5)
    (fused_out,), (plain_out,) = run_model(result.model, feeds), run_model(unfused, feeds)
    sqnr = _sqnr(plain_out, fused_out)
    assert sqnr >= 45.0, f"fused vs two-op SiLU: SQNR {sqnr:.1f} dB < 45 dB"


def test_tensorrt_and_weight_only_keep_sigmoid_and_mul():
    assert not TENSORRT.fuse_silu
    trt = _quantize(_model(), target="tensorrt")
    assert "QuickGelu" not in _ops(trt.model) and _ops(trt.model).count("Sigmoid") == 2
    weight_only = _quantize(_model(), abits=0)  # no act DQ: onnxruntime fuses the float SiLU itself
    assert "QuickGelu" not in _ops(weight_only.model) and _ops(weight_only.model).count("Sigmoid") == 2


def test_a_sigmoid_read_elsewhere_or_a_float_input_is_not_fused():
    # d is a DequantizeLinear's output, but its Sigmoid is also a graph output; x is no DQ's output
    model = onnx.parser.parse_model(HEADER + """
net (uint8[N, 4] q, float[N, 4] x) => (float[N, 4] y, float[N, 4] s, float[N, 4] z)
    <float sc = {0.1}, uint8 zp = {128}> {
    d = DequantizeLinear (q, sc, zp)
    s = Sigmoid (d)
    y = Mul (d, s)
    t = Sigmoid (x)
    z = Mul (x, t)
}""")
    out = STAGES.get("silu")(model, None, ONNXRUNTIME)
    assert _ops(out) == ["DequantizeLinear", "Sigmoid", "Mul", "Sigmoid", "Mul"], _ops(out)
    assert not any(o.domain == "com.microsoft" for o in out.opset_import)


# a YOLOv8 box head: bins on axis 2 of [N, 4, 16, A], transposed to axis 1 for Softmax, then summed by a Conv
BOX_HEAD = HEADER + """
net (float[N, 4, 16, 30] x) => (float[N, 16, 4, 30] y, float[N, 4, 30, 16] z) {
    t = Transpose <perm = [0, 2, 1, 3]> (x)
    y = Softmax <axis = 1> (t)
    u = Transpose <perm = [0, 1, 3, 2]> (x)
    z = Softmax <axis = -1> (u)
}"""


def test_a_softmax_along_an_early_axis_of_a_transpose_runs_before_it_with_the_same_values():
    model = onnx.parser.parse_model(BOX_HEAD)
    out = STAGES.get("softmax")(_copy(model), None, ONNXRUNTIME)
    got = [(n.op_type, n.input[0], n.output[0], onnx.helper.get_attribute_value(n.attribute[0])) for n in out.graph.node]
    assert got == [("Softmax", "x", "t", 2), ("Transpose", "t", "y", [0, 2, 1, 3]),  # axis 1 of t is axis 2 of x
                   ("Transpose", "x", "u", [0, 1, 3, 2]), ("Softmax", "u", "z", -1)], got  # already last: kept
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 4, 16, 30)).astype(np.float32) * 4}
    for before, after in zip(run_model(model, feeds), run_model(out, feeds)):
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-7)
    assert _ops(STAGES.get("softmax")(_copy(model), None, TENSORRT)) == _ops(model)


def test_a_transpose_read_elsewhere_or_an_opset_11_softmax_stays_in_front():
    shared = onnx.parser.parse_model(HEADER + """
net (float[N, 4, 16, 30] x) => (float[N, 16, 4, 30] y, float[N, 16, 4, 30] t) {
    t = Transpose <perm = [0, 2, 1, 3]> (x)
    y = Softmax <axis = 1> (t)
}""")
    assert _ops(STAGES.get("softmax")(_copy(shared), None, ONNXRUNTIME)) == ["Transpose", "Softmax"]
    old = onnx.parser.parse_model(BOX_HEAD.replace('"" : 17', '"" : 11'))  # Softmax then flattens axes 1..3
    assert _ops(STAGES.get("softmax")(_copy(old), None, ONNXRUNTIME)) == _ops(old)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# A → (Sigmoid, read also by the graph output z) ⊕ A → C: the Concat's output is C's quantized input
CONCAT = HEADER + """
net (float[N, 16, 10, 10] x) => (float[N, 16, 10, 10] y, float[N, 32, 10, 10] z) {
    a = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, wa)
    s = Sigmoid (a)
    z = Relu (s)
    c = Concat <axis = 1> (s, a)
    y = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (c, wc)
}"""
CONCAT_WEIGHTS = dict(wa=(32, 16, 3, 3), wc=(16, 64, 3, 3))


def test_a_quantized_concat_reads_its_float_inputs_on_its_own_step_and_runs_on_integers(tmp_path):
    model = _model(CONCAT, **CONCAT_WEIGHTS)
    result = _quantize(model)
    g = result.model.graph
    producer = {o: n for n in g.node for o in n.output}
    concat = next(n for n in g.node if n.op_type == "Concat")
    dqs = [producer[i] for i in concat.input]
    assert [d.op_type for d in dqs] == ["DequantizeLinear"] * 2, dqs
    output_q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == concat.output[0])
    assert producer[dqs[0].input[0]].input == ["s", output_q.input[1], output_q.input[2]]  # on the Concat's step
    assert producer[dqs[1].input[0]].input[1] != output_q.input[1]  # a keeps its own act point's step
    assert next(n for n in g.node if n.op_type == "Relu").input == ["s"]  # the other reader reads float
    path = tmp_path / "optimized.onnx"
    session(result.model, ["CPUExecutionProvider"], threads=1, opts=session_options(optimized_path=str(path)))
    assert "QLinearConcat" in _ops(onnx.load(path)) and "Concat" not in _ops(onnx.load(path)), _ops(onnx.load(path))

    canonical = build_plan(model, resolve(QuantConfig(method="rtn")).plan).model
    plain = emit(canonical, result.params, dataclasses.replace(ONNXRUNTIME, quantize_concat_inputs=False))
    assert _ops(plain).count("QuantizeLinear") == _ops(result.model).count("QuantizeLinear") - 1
    feeds = _data(8, seed=9)
    for got, want in zip(run_model(result.model, feeds), run_model(plain, feeds)):
        np.testing.assert_array_equal(got, want)  # the same integers: rounding before the Concat changes nothing
    trt = _quantize(model, target="tensorrt")
    concat = next(n for n in trt.model.graph.node if n.op_type == "Concat")
    assert "s" in concat.input, "tensorrt's Concat reads the float Sigmoid output as before"


def test_a_concat_that_a_subgraph_also_reads_keeps_its_float_inputs():
    """The If's branch reads the Concat's output from the outer scope: quantizing the Concat's inputs
    would hand it rounded values, so the Concat is left as it is; without the If it is rewritten."""
    from onnx import TensorProto, helper

    from onnxflex.emit.concat import quantize_concat_inputs
    from onnxflex.graph import NameScope

    def graph(with_if: bool) -> onnx.GraphProto:
        branch = helper.make_graph([helper.make_node("Identity", ["c"], ["b"])], "branch", [],
                                   [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
        nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["s"]),
                 helper.make_node("Concat", ["a", "s"], ["c"], axis=1),
                 helper.make_node("QuantizeLinear", ["c", "scale", "zero"], ["cq"])]
        if with_if:
            nodes.append(helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch))
        inits = [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
                 helper.make_tensor("zero", TensorProto.UINT8, [], [128])]
        return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
                                              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                                 [helper.make_tensor_value_info("cq", TensorProto.UINT8, [1, 4])], inits)

    plain, read_inside = graph(False), graph(True)
    assert quantize_concat_inputs(plain, NameScope.of(helper.make_model(plain))) == 2
    assert quantize_concat_inputs(read_inside, NameScope.of(helper.make_model(read_inside))) == 0
    concat = next(n for n in read_inside.node if n.op_type == "Concat")
    assert list(concat.input) == ["a", "s"]
