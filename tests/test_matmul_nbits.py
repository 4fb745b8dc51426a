"""Blocked 4-bit MatMul weights that onnxruntime would leave as DequantizeLinear + float MatMul (the
MatMul's output goes to a Relu) are written as MatMulNBits (onnxflex/emit/nbits.py), in the layout
onnxruntime's own fusion makes, so they run as its 4-bit kernel and compute the same numbers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxflex import QuantConfig, quantize
from onnxflex.emit.nbits import accuracy_level, write_unfused
from onnxflex.ort import session, session_options
from onnxflex.verify import optimized_op_counts

N, G = 24, 32


def dq_matmul(signed: bool, relu: bool, seed: int = 0, K: int = 96) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    ints = rng.integers(lo, hi, (K, N))
    kind = TensorProto.INT4 if signed else TensorProto.UINT4
    inits = [helper.make_tensor("w_q", kind, [K, N], ints.reshape(-1).tolist()),
             numpy_helper.from_array(rng.uniform(0.01, 0.1, (-(-K // G), N)).astype(np.float32), "w_s")]
    dq_inputs = ["w_q", "w_s"]
    if not signed:
        inits.append(helper.make_tensor("w_z", TensorProto.UINT4, [-(-K // G), N],
                                        rng.integers(0, 16, (-(-K // G), N)).reshape(-1).tolist()))
        dq_inputs.append("w_z")
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["w"], axis=0, block_size=G),
             helper.make_node("MatMul", ["x", "w"], ["m"], name="mm")]
    if relu:
        nodes.append(helper.make_node("Relu", ["m"], ["y"]))
    out = "y" if relu else "m"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [4, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def fused_by_onnxruntime(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    path = tmp_path / "optimized.onnx"
    session(model, ["CPUExecutionProvider"], opts=session_options(optimized_path=str(path)))
    return onnx.load(str(path))


def written(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    assert write_unfused(out.graph) == 1
    out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


@pytest.mark.parametrize("k", [96, 80], ids=["three_blocks", "short_last_block"])  # odd counts pad zero points
@pytest.mark.parametrize("signed", [True, False], ids=["symmetric", "asymmetric"])
def test_the_written_node_is_the_one_onnxruntime_fuses_without_the_relu(signed, k, tmp_path):
    ours = written(dq_matmul(signed, relu=True, K=k))
    assert [n.op_type for n in ours.graph.node] == ["MatMulNBits", "Relu"]
    theirs = fused_by_onnxruntime(dq_matmul(signed, relu=False, K=k), tmp_path)
    assert [n.op_type for n in theirs.graph.node] == ["MatMulNBits"], [n.op_type for n in theirs.graph.node]
    mine, fused = ours.graph.node[0], theirs.graph.node[0]
    attrs = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "weight_prepacked"}
    assert attrs(mine) == attrs(fused)
    arrays = lambda m, node: [numpy_helper.to_array({t.name: t for t in m.graph.initializer}[i]) for i in node.input[1:]]
    assert len(arrays(ours, mine)) == (2 if signed else 3)
    for a, b in zip(arrays(ours, mine), arrays(theirs, fused), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a.reshape(-1), b.reshape(-1))
    x = {"x": np.random.default_rng(1).standard_normal((4, k)).astype(np.float32)}
    got = session(ours, ["CPUExecutionProvider"]).run(None, x)[0]
    want = np.maximum(session(theirs, ["CPUExecutionProvider"]).run(None, x)[0], 0)
    assert np.array_equal(got, want)


def test_pairs_onnxruntime_fuses_itself_are_left_as_they_are():
    model = dq_matmul(True, relu=False)
    assert write_unfused(model.graph) == 0
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]


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


@pytest.mark.parametrize("grid", ["symmetric", "asymmetric"])
def test_a_weight_only_relu_mlp_runs_every_layer_as_matmul_nbits(grid, tmp_path):
    path, calib = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(relu_mlp(), path)
    np.savez(calib, x=np.random.default_rng(2).standard_normal((48, 64)).astype(np.float32))
    config = QuantConfig(wbits=4, abits=0, group_size=32, method="rtn", weight_grid=grid, calib_samples=32,
                         verify_samples=16, seed=0)
    result = quantize(str(path), str(calib), config, progress=False)
    assert optimized_op_counts(result.model) == {"MatMulNBits": 3, "Relu": 2}
    assert [n.op_type for n in result.model.graph.node].count("MatMulNBits") == 2  # the last one onnxruntime fuses
    sqnr = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]
    assert min(sqnr.values()) > 40, sqnr


@pytest.mark.parametrize(("k", "n", "level"), [(96, 24, 0), (128, 128, 0), (255, 4096, 0), (4096, 255, 0),
                                               (256, 256, 4), (256, 8210, 4), (4096, 4096, 4)])
def test_the_accuracy_level_is_4_from_the_measured_size_up(k, n, level):
    assert accuracy_level(k, n) == level


def test_a_large_written_node_is_the_one_onnxruntime_fuses_at_its_default_level(tmp_path):
    model = dq_matmul(True, relu=True, K=256)
    del model.graph.initializer[:]
    rng = np.random.default_rng(3)
    model.graph.initializer.extend([
        helper.make_tensor("w_q", TensorProto.INT4, [256, 256], rng.integers(-8, 8, 256 * 256).tolist()),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, (256 // G, 256)).astype(np.float32), "w_s")])
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[1].dim_value = 256
    ours = written(model)
    mine = ours.graph.node[0]
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    plain.graph.node.pop()
    plain.graph.output[0].name = "m"
    path = tmp_path / "optimized.onnx"
    session(plain, ["CPUExecutionProvider"], opts=session_options(matmulnbits=False, optimized_path=str(path)))
    fused = onnx.load(str(path)).graph.node[0]
    assert fused.op_type == "MatMulNBits"
    attrs = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "weight_prepacked"}
    assert attrs(mine) == attrs(fused) and attrs(mine)["accuracy_level"] == 4
