"""Blocked 4-bit MatMul weights are written as com.microsoft MatMulNBits by the emitter's weights stage
(onnxflex/emit/nbits.py), straight from the integers, in the layout onnxruntime's own fusion of the
DequantizeLinear form makes, with an accuracy level chosen per layer: they compute the same numbers as
that fusion at the same level, also where onnxruntime would not fuse (the MatMul's output goes to a Relu)."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxflex import QuantConfig, quantize
from onnxflex.emit import emit
from onnxflex.emit.nbits import accuracy_level
from onnxflex.ort import session, session_options
from onnxflex.qparams import ActParams, QuantizedWeight, QuantParams
from onnxflex.runtimes.onnxruntime import ONNXRUNTIME
from onnxflex.verify import optimized_op_counts

N, G = 24, 32
DQ_FORM = dataclasses.replace(ONNXRUNTIME, matmul_nbits=False)  # the blocked DequantizeLinear form


def float_matmul(relu: bool, K: int = 96, n: int = N) -> onnx.ModelProto:
    """x [4, K] → MatMul "mm" with the float weight "w" [K, n] (→ Relu); opset 21."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm")]
    if relu:
        nodes.append(helper.make_node("Relu", ["m"], ["y"], name="relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
                              [helper.make_tensor_value_info("y" if relu else "m", TensorProto.FLOAT, [4, n])],
                              [numpy_helper.from_array(np.zeros((K, n), np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def blocked_weight(signed: bool, K: int = 96, n: int = N, seed: int = 0) -> QuantizedWeight:
    """Random 4-bit integers blocked by G along K: signed with zero point 0, or unsigned with zero points."""
    rng = np.random.default_rng(seed)
    blocks = -(-K // G)
    scale = rng.uniform(0.01, 0.1, (blocks, n)).astype(np.float32)
    if signed:
        return QuantizedWeight(rng.integers(-8, 8, (K, n)).astype(np.int8), scale, np.zeros((blocks, n), np.int8),
                               axis=0, bits=4, block_size=G)
    return QuantizedWeight(rng.integers(0, 16, (K, n)).astype(np.uint8), scale,
                           rng.integers(0, 16, (blocks, n)).astype(np.uint8), axis=0, bits=4, block_size=G)


def emitted(model: onnx.ModelProto, qw: QuantizedWeight, target=ONNXRUNTIME, **params) -> onnx.ModelProto:
    return emit(model, QuantParams(weights={"w": qw}, **params), target)


def fused_by_onnxruntime(model: onnx.ModelProto, tmp_path, opts=None) -> onnx.ModelProto:
    path = tmp_path / "optimized.onnx"
    session(model, ["CPUExecutionProvider"], opts=opts or session_options(optimized_path=str(path)))
    return onnx.load(str(path))


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "weight_prepacked"}


def arrays(model: onnx.ModelProto, node: onnx.NodeProto) -> list[np.ndarray]:
    inits = {t.name: t for t in model.graph.initializer}
    return [numpy_helper.to_array(inits[name]) for name in node.input[1:]]


@pytest.mark.parametrize("k", [96, 80], ids=["three_blocks", "short_last_block"])  # odd counts pad zero points
@pytest.mark.parametrize("signed", [True, False], ids=["symmetric", "asymmetric"])
def test_the_written_node_is_the_one_onnxruntime_fuses_without_the_relu(signed, k, tmp_path):
    qw = blocked_weight(signed, K=k)
    ours = emitted(float_matmul(relu=True, K=k), qw)
    assert [n.op_type for n in ours.graph.node] == ["MatMulNBits", "Relu"]
    plain = emitted(float_matmul(relu=False, K=k), qw, DQ_FORM)
    assert [n.op_type for n in plain.graph.node] == ["DequantizeLinear", "MatMul"]
    theirs = fused_by_onnxruntime(plain, tmp_path)
    assert [n.op_type for n in theirs.graph.node] == ["MatMulNBits"], [n.op_type for n in theirs.graph.node]
    mine, fused = ours.graph.node[0], theirs.graph.node[0]
    assert attrs(mine) == attrs(fused)
    assert len(arrays(ours, mine)) == (2 if signed else 3)
    for a, b in zip(arrays(ours, mine), arrays(theirs, fused), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a.reshape(-1), b.reshape(-1))
    x = {"x": np.random.default_rng(1).standard_normal((4, k)).astype(np.float32)}
    got = session(ours, ["CPUExecutionProvider"]).run(None, x)[0]
    want = np.maximum(session(theirs, ["CPUExecutionProvider"]).run(None, x)[0], 0)
    assert np.array_equal(got, want)
    float_w = qw.dequantize()
    np.testing.assert_allclose(got, np.maximum(x["x"] @ float_w, 0), rtol=1e-4, atol=1e-4)


def test_pairs_onnxruntime_would_fuse_are_written_too_with_their_own_level():
    """A pair onnxruntime fuses itself would run at the session's level (4 by default, slower than
    float on small layers): it is written as well, with the level for its shape."""
    model = emitted(float_matmul(relu=False), blocked_weight(True))
    node = model.graph.node[0]
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"] and node.output[0] == "m"
    assert node.name == "mm" and node.domain == "com.microsoft" and node.input[0] == "x"
    assert attrs(node)["accuracy_level"] == accuracy_level(96, N) == 0
    assert [t.name for t in model.graph.initializer] == ["mm_nbits_B", "mm_nbits_scales"], "the float w dropped"
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    onnx.checker.check_model(model, full_check=True)


def test_no_dequantize_linear_form_of_a_written_weight_is_ever_built(monkeypatch):
    """The packed 4-bit integers exist once: written as MatMulNBits where they are emitted, never
    first packed as INT4 for a DequantizeLinear that a later rewrite replaces (the model proto would
    hold both until it is freed)."""
    from onnxflex.emit import qdq

    packed = []
    monkeypatch.setattr(qdq, "int4_initializer", lambda values, name, signed: packed.append(name))
    model = emitted(float_matmul(relu=False), blocked_weight(False))
    assert packed == [] and [n.op_type for n in model.graph.node] == ["MatMulNBits"], packed


def test_a_weight_with_another_reader_stays_a_dequantize_linear():
    model = float_matmul(relu=False)
    model.graph.node.append(helper.make_node("Identity", ["w"], ["w_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, [96, N]))
    out = emitted(model, blocked_weight(True))
    assert sorted(n.op_type for n in out.graph.node) == ["DequantizeLinear", "Identity", "MatMul"]


def test_a_matmul_with_quantized_activations_stays_a_dequantize_linear():
    """An act point on A gets its own Q/DQ pair: that MatMul is left to the runtime's integer fusion."""
    out = emitted(float_matmul(relu=False), blocked_weight(True), acts={"x": ActParams(0.05, 128, TensorProto.UINT8)})
    assert "MatMulNBits" not in {n.op_type for n in out.graph.node}
    assert sorted(n.op_type for n in out.graph.node) == ["DequantizeLinear", "DequantizeLinear", "MatMul",
                                                         "QuantizeLinear"]


def test_a_weight_in_an_if_branch_is_written_in_that_branch(tmp_path):
    """A MatMul in an If's branch, its weight the branch's own initializer, becomes MatMulNBits there."""
    branch = float_matmul(relu=True).graph
    branch.ClearField("input")
    then = helper.make_graph(list(branch.node), "then", [], list(branch.output), list(branch.initializer))
    other = helper.make_graph([helper.make_node("Relu", ["z"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [4, N])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["out"], name="if", then_branch=then, else_branch=other)], "top",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 96]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, N])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, N])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    qw = blocked_weight(True)
    out = emitted(model, qw)
    written = out.graph.node[0].attribute[0].g if out.graph.node[0].attribute[0].name == "then_branch" else \
        out.graph.node[0].attribute[1].g
    assert [n.op_type for n in written.node] == ["MatMulNBits", "Relu"]
    x = np.random.default_rng(1).standard_normal((4, 96)).astype(np.float32)
    got = session(out, ["CPUExecutionProvider"]).run(None, {"c": np.array(True), "x": x,
                                                             "z": np.zeros((4, N), np.float32)})[0]
    np.testing.assert_allclose(got, np.maximum(x @ qw.dequantize(), 0), rtol=1e-4, atol=1e-4)
    from onnxflex.check import check, format_report

    report = check(out)
    layers = {layer.node: (layer.op_type, layer.kernel, layer.integer) for layer in report.layers}
    assert layers.get("mm") == ("MatMulNBits", "MatMulNBits", True), format_report(report)


def relu_mlp(layers: int = 3, width: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / 8).astype(np.float32), f"w{k}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"], name=f"matmul{k}"))
        x = f"m{k}"
        if k < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{k}"]))
            x = f"r{k}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def quantized_mlp(tmp_path, **options):
    path, calib = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(relu_mlp(), path)
    np.savez(calib, x=np.random.default_rng(2).standard_normal((48, 64)).astype(np.float32))
    config = QuantConfig(wbits=4, abits=0, group_size=32, method="rtn", calib_samples=32, verify_samples=16,
                         seed=0, **options)
    return quantize(str(path), str(calib), config, progress=False)


@pytest.mark.parametrize("grid", ["symmetric", "asymmetric"])
def test_a_weight_only_relu_mlp_runs_every_layer_as_matmul_nbits(grid, tmp_path):
    result = quantized_mlp(tmp_path, weight_grid=grid)
    assert optimized_op_counts(result.model) == {"MatMulNBits": 3, "Relu": 2}
    assert [n.op_type for n in result.model.graph.node].count("MatMulNBits") == 2  # the last, the head, is 8-bit
    sqnr = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]
    assert min(sqnr.values()) > 40, sqnr


@pytest.mark.parametrize(("k", "n", "level"), [(96, 24, 0), (128, 128, 0), (255, 4096, 0), (4096, 255, 0),
                                               (256, 256, 4), (256, 8210, 4), (4096, 4096, 4)])
def test_the_accuracy_level_is_4_from_the_measured_size_up(k, n, level):
    assert accuracy_level(k, n) == level


def test_a_large_written_node_is_the_one_onnxruntime_fuses_at_its_default_level(tmp_path):
    qw = blocked_weight(True, K=256, n=256, seed=3)
    mine = emitted(float_matmul(relu=True, K=256, n=256), qw).graph.node[0]
    plain = emitted(float_matmul(relu=False, K=256, n=256), qw, DQ_FORM)
    path = tmp_path / "optimized.onnx"
    fused = fused_by_onnxruntime(plain, tmp_path, session_options(matmulnbits=False, optimized_path=str(path)))
    assert [n.op_type for n in fused.graph.node] == ["MatMulNBits"]
    assert attrs(mine) == attrs(fused.graph.node[0]) and attrs(mine)["accuracy_level"] == 4


def test_check_lists_the_written_matmul_nbits_as_integer_layers(tmp_path):
    from onnxflex.check import check, format_report

    report = check(quantized_mlp(tmp_path).model)
    assert report.ok, format_report(report)
    layers = {layer.node: layer for layer in report.layers}
    assert {name: (layers[name].op_type, layers[name].kernel, layers[name].integer)
            for name in ("matmul0", "matmul1")} == {name: ("MatMulNBits", "MatMulNBits", True)
                                                    for name in ("matmul0", "matmul1")}, format_report(report)
