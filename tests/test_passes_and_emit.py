"""Graph passes on the bundled CNN and tiny graphs; the emitted QDQ structure; the onnxruntime fallback."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from helpers import CNN, run_model
from onnxflex.config import QuantConfig
from onnxflex.errors import ConfigError, UnsupportedModelError
from onnxflex.options import resolve
from onnxflex.passes.pipeline import PassContext, run_passes
from onnxflex.pipeline import build_plan
from onnxflex.qparams import sqnr_db


def test_bn_folding_is_exact_on_the_bundled_cnn():
    model = onnx.load(str(CNN))
    folded = run_passes(model, PassContext(resolve(QuantConfig()).plan))
    ops = [n.op_type for n in folded.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 8
    x = np.random.default_rng(0).standard_normal((16, 1, 16, 16)).astype(np.float32)
    db = sqnr_db(run_model(model, {"input": x})[0], run_model(folded, {"input": x})[0])
    assert db > 100, f"folded model differs from the original: {db:.1f} dB"


def test_block_plan_keeps_residual_units_whole():
    plan = build_plan(onnx.load(str(CNN)), resolve(QuantConfig(latency_rules=False)).plan)  # every conv
    assert [len(b.layers) for b in plan.blocks] == [1, 2, 3, 2, 1]
    assert all(len(b.inputs) == 1 and len(b.outputs) == 1 for b in plan.blocks)
    nodes = [n for b in plan.blocks for n in b.nodes]
    assert sorted(nodes) == sorted(n.name for n in plan.model.graph.node), "every node in exactly one block"
    layer_plan = build_plan(onnx.load(str(CNN)), resolve(QuantConfig(granularity="layer", latency_rules=False)).plan)
    assert [len(b.layers) for b in layer_plan.blocks] == [1] * 9
    assert max(len(b.inputs) for b in layer_plan.blocks) == 2, "a residual skip crosses layer blocks"


def test_weight_only_plan_has_no_activation_points():
    assert build_plan(onnx.load(str(CNN)), resolve(QuantConfig(abits=0)).plan).act_points == ()


def test_emitted_graph_structure(quantized_cnn):
    model = quantized_cnn(method="rtn", wbits=8, abits=8, latency_rules=False).model  # every Conv and Gemm
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    assert model.ir_version <= 10 and [o.version for o in model.opset_import if o.domain == ""] == [13]
    for node in (n for n in g.node if n.op_type in ("Conv", "Gemm")):
        w_dq, b_dq = producer[node.input[1]], producer[node.input[2]]
        assert w_dq.op_type == "DequantizeLinear" and b_dq.op_type == "DequantizeLinear"
        w = inits[w_dq.input[0]]
        assert w.data_type == TensorProto.INT8, node.name
        axis = {a.name: a.i for a in w_dq.attribute}["axis"]
        channels = w.dims[axis]
        assert list(inits[w_dq.input[1]].dims) == [channels]
        assert not numpy_helper.to_array(inits[w_dq.input[2]]).any(), "weights are symmetric"
        assert inits[b_dq.input[0]].data_type == TensorProto.INT32
        assert producer[node.input[0]].op_type == "DequantizeLinear", f"{node.name} input is not quantized"
        users = [n for n in g.node if node.output[0] in n.input]
        if len(users) == 1 and users[0].op_type == "Relu":
            users = [n for n in g.node if users[0].output[0] in n.input]
        assert [n.op_type for n in users] == ["QuantizeLinear"], f"{node.name}: output not quantized ({users})"
    acts = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[2]].data_type == TensorProto.UINT8 for n in acts)
    assert [o.name for o in g.output] == ["logits"]


def test_emitted_model_declares_no_inferred_shapes(quantized_cnn):
    """The canonical model carries onnx's inferred shapes; onnxruntime runs a graph declaring them
    10-15 % slower, so the emitted model leaves them out (graph inputs and outputs keep theirs)."""
    assert len(build_plan(onnx.load(str(CNN)), resolve(QuantConfig()).plan).model.graph.value_info) > 0
    model = quantized_cnn(method="rtn", wbits=8, abits=8).model
    assert len(model.graph.value_info) == 0
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["N", 1, 16, 16]


def unconverted_op_model():
    rng = np.random.default_rng(0)

    def conv(name, cin, cout, x, y):
        w = numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.2).astype(np.float32), name + "_w")
        return helper.make_node("Conv", [x, w.name], [y], name=name, pads=[1, 1, 1, 1]), [w]

    n1, i1 = conv("c1", 3, 8, "x", "a")
    n2, i2 = conv("c2", 8, 8, "r", "y")
    nodes = [n1, helper.make_node("Relu", ["a"], ["a2"], name="relu"),
             helper.make_node("Shrink", ["a2"], ["r"], name="shrink", lambd=0.1), n2]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], i1 + i2)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    return m, {"x": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}


def test_block_without_torch_converter_runs_in_onnxruntime(caplog):
    model, calib = unconverted_op_model()
    with caplog.at_level("WARNING", logger="onnxflex"):
        result = onnxflex.quantize(model, calib, QuantConfig(iters=20, granularity="layer", latency_rules=False),
                                   progress=False)  # c1 (depth 27) is read by a float Relu → Shrink
    assert "Shrink (node 'shrink')" in caplog.text and "round-to-nearest" in caplog.text
    blocks = result.report["blocks"]
    assert [b["runtime"] for b in blocks] == ["onnxruntime", "torch"] and blocks[0]["iters"] == 0
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 40, f"fallback block simulation differs from onnxruntime: {sim:.1f} dB"
    assert "Shrink" in result.report["verification"]["optimized_graph_ops"]


def test_model_without_quantizable_layers_is_refused():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedModelError, match="no quantizable layer"):
        onnxflex.quantize(m, {"x": np.ones((8, 4), np.float32)}, QuantConfig(), progress=False)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key"):
        QuantConfig.from_dict({"wbit": 4})
    with pytest.raises(ConfigError, match="method='bogus'"):
        QuantConfig(method="bogus")
    assert QuantConfig.from_dict({"exclude_nodes": ["a"]}).exclude_nodes == ("a",)


def test_same_seed_gives_identical_bytes():
    a = onnxflex.quantize(CNN, config=QuantConfig(iters=10, seed=3), progress=False)
    b = onnxflex.quantize(CNN, config=QuantConfig(iters=10, seed=3), progress=False)
    assert a.model.SerializeToString() == b.model.SerializeToString()


def test_mapped_packages_refuse_their_directory_names(tmp_path):
    from helpers import ROOT

    for pkg in ("passes", "runtimes"):
        result = subprocess.run([sys.executable, "-c", f"import {pkg}"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode != 0 and f"onnxflex.{pkg}" in result.stderr


@pytest.mark.gpu
def test_cuda_device_quantizes_the_cnn():
    result = onnxflex.quantize(CNN, config=QuantConfig(device="cuda", iters=20), progress=False)
    assert result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["logits"] >= 30


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                   np.uint16, np.uint32, np.uint64, np.bool_, np.float16])
@pytest.mark.parametrize("shape", [(), (0,), (3, 2)])
def test_a_constant_value_reads_as_the_reference_evaluator_gives_it(dtype, shape):
    """canonicalize turns Constant nodes into initializers: a plain-typed value read directly is the
    array the reference evaluator gives, stored raw or in the typed fields; float16 goes through the
    evaluator itself."""
    from onnx.reference import ReferenceEvaluator

    from onnxflex.passes.canonicalize import _constant_value

    array = (np.arange(int(np.prod(shape))) - 2).reshape(shape).astype(dtype)
    stored = [numpy_helper.from_array(array, "v"),
              helper.make_tensor("v", helper.np_dtype_to_tensor_dtype(array.dtype), shape, array.reshape(-1).tolist())]
    for tensor in stored:
        node = helper.make_node("Constant", [], ["c"], value=tensor)
        ours, reference = _constant_value(node), ReferenceEvaluator(node).run(None, {})[0]
        assert ours.dtype == reference.dtype and ours.shape == reference.shape, (ours.dtype, reference.dtype)
        np.testing.assert_array_equal(ours, reference)
