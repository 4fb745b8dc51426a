"""Model headers real exporters write: dynamic batch as dim_value -1 or 0, empty or generated dim_params,
IR versions newer than the installed onnxruntime reads, integer and bool inputs. Each one quantizes
end to end and compares, or is refused in one line."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from onnxflex.calib import fixed_batch
from onnxflex.inputs import input_dims
from onnxflex.compare import compare_models
from onnxflex.options import resolve

RTN = onnxflex.QuantConfig(method="rtn")
MIN_SQNR = 15.0  # W8A8 on an 8x4 MatMul calibrated on 30 samples lands at 20-40 dB; broken feeding at < 5


def matmul_model(batch_dim, ir_version: int = 8, opset: int = 17) -> onnx.ModelProto:
    """y = x @ w, x[batch_dim, 8] with the batch declared as given (an int, or a str for dim_param)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def quantize_and_compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path, config=RTN):
    """Quantize, save, and run ``onnxflex compare`` on the pair; returns (QuantResult, Comparison)."""
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    result = onnxflex.quantize(str(src), feeds, config, progress=False)
    out = result.save(tmp_path / "model.q.onnx")
    np.savez(tmp_path / "eval.npz", **feeds)
    return result, compare_models(src, out, tmp_path / "eval.npz", repeats=1, worst=0)


@pytest.mark.parametrize("batch_dim", [-1, 0, "", "unk__214"], ids=["minus1", "zero", "empty", "symbolic"])
def test_unknown_batch_dims_quantize_and_compare(batch_dim, tmp_path):
    model = matmul_model(batch_dim)
    assert input_dims(model.graph.input[0]) == [None, 8] and fixed_batch(model) is None
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    result, comparison = quantize_and_compare(model, {"x": x}, tmp_path)
    verification = result.report["verification"]
    assert verification["samples"] == 10, verification
    assert verification["quantized_vs_fp32_sqnr_db"]["y"] > MIN_SQNR, verification
    emitted = [d for vi in result.model.graph.input for d in vi.type.tensor_type.shape.dim][0]
    assert not (emitted.HasField("dim_value") and emitted.dim_value <= 0), f"emitted batch dim {emitted}"
    sqnr = comparison.outputs[0]["sqnr_db"]
    assert comparison.samples == 40 and sqnr > MIN_SQNR, f"compare: {comparison.samples} samples, SQNR {sqnr:.1f} dB"


def test_minus1_dims_of_an_opset_11_export_survive_the_opset_upgrade(tmp_path):
    """paddle2onnx's legacy header (batch and width -1) on an opset 11 graph: the upgrade to 13 infers
    shapes, which must not compute with -1: MaxPool halves a width of -1 to 0, and onnxruntime refused
    tests/zoo/paddle_rec_m1.onnx for the Reshape that then copies a declared 0."""
    from onnxflex.pipeline import build_plan

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, -1, 16], np.int64), "shape")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 2, 8, -1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, -1, 16])
    graph = helper.make_graph([
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["p"], ["t"], name="transpose", perm=[3, 0, 1, 2]),
        helper.make_node("Reshape", ["t", "shape"], ["y"], name="reshape")], "g", [x], [y], [w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    plan = build_plan(model, resolve(RTN).plan)
    inferred = {d.dim_value for vi in plan.model.graph.value_info for d in vi.type.tensor_type.shape.dim
                if d.HasField("dim_value")}
    assert min(inferred, default=1) > 0, f"the canonical model declares dims {sorted(inferred)}"
    feeds = {"x": np.random.default_rng(1).standard_normal((40, 2, 8, 12)).astype(np.float32)}
    result, comparison = quantize_and_compare(model, feeds, tmp_path)
    assert comparison.outputs[0]["sqnr_db"] > MIN_SQNR, comparison.outputs


def test_a_positive_dim_value_still_fixes_the_batch():
    assert fixed_batch(matmul_model(4)) == 4


def invoke(*args):
    from click.testing import CliRunner

    from onnxflex.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_the_installed_onnxruntime_limits_are_found_by_loading():
    import onnxruntime as ort

    from onnxflex.ort import max_ir_version, max_opset

    assert 7 <= max_ir_version() <= onnx.IR_VERSION and 13 <= max_opset() <= onnx.defs.onnx_opset_version()
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    ort.InferenceSession(matmul_model("N", max_ir_version(), 17).SerializeToString(), opts,
                         providers=["CPUExecutionProvider"])
    if max_ir_version() < onnx.IR_VERSION:
        with pytest.raises(Exception, match="IR version"):
            ort.InferenceSession(matmul_model("N", max_ir_version() + 1, 17).SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"])


def test_an_ir_version_newer_than_onnxruntime_reads_quantizes_and_compares(tmp_path):
    from onnxflex.verify import optimized_op_counts

    model = matmul_model("N", ir_version=onnx.IR_VERSION)  # onnx writes its newest IR by default
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    result, comparison = quantize_and_compare(model, {"x": x}, tmp_path)
    assert result.report["verification"]["quantized_vs_fp32_sqnr_db"]["y"] > MIN_SQNR, result.report["verification"]
    assert comparison.outputs[0]["sqnr_db"] > MIN_SQNR, comparison.outputs
    assert optimized_op_counts(model) == {"MatMul": 1}
    cli = invoke("compare", tmp_path / "model.onnx", tmp_path / "model.q.onnx", "--data", tmp_path / "eval.npz",
                 "--repeats", "1", "--min-sqnr", MIN_SQNR)
    assert cli.exit_code == 0, cli.output
    assert "gates: all passed" in cli.output


def test_an_opset_newer_than_onnxruntime_reads_is_converted_down(tmp_path):
    from onnxflex.ort import max_opset

    newest = onnx.defs.onnx_opset_version()
    if newest <= max_opset():
        pytest.skip(f"the installed onnxruntime reads the installed onnx's newest opset {newest}")
    x = np.random.default_rng(3).standard_normal((40, 8)).astype(np.float32)
    result, comparison = quantize_and_compare(matmul_model("N", onnx.IR_VERSION, newest), {"x": x}, tmp_path)
    assert comparison.outputs[0]["sqnr_db"] > MIN_SQNR, comparison.outputs


def test_an_opset_onnxruntime_cannot_read_nor_onnx_lower_is_refused_in_one_line(tmp_path):
    import onnxruntime as ort

    from onnxflex.ort import max_opset

    if max_opset() >= 28 or onnx.defs.onnx_opset_version() < 28:
        pytest.skip("needs an onnx that knows SwiGLU (opset 28) and an onnxruntime that does not")
    x, z = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8]) for n in "xz")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    graph = helper.make_graph([helper.make_node("SwiGLU", ["x", "z"], ["y"], name="s")], "g", [x, z], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 28)]), tmp_path / "m.onnx")
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((4, 8)).astype(np.float32),
             z=rng.standard_normal((4, 8)).astype(np.float32))
    cli = invoke("compare", tmp_path / "m.onnx", tmp_path / "m.onnx", "--data", tmp_path / "eval.npz")
    assert cli.exit_code == 2, cli.output
    line = cli.output.strip()
    assert "\n" not in line and "opset 28" in line and ort.__version__ in line and "re-export" in line, line


def typed_inputs_model() -> onnx.ModelProto:
    """y = Where(mask, (x + float(bytes)) * float(ids) + float(offset), 0) @ w, with bytes uint8[N, 8],
    ids int32[N, 1], offset int64[N, 1], mask bool[N, 8]."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Cast", ["bytes"], ["bf"], to=f, name="c1"),
             helper.make_node("Cast", ["ids"], ["idf"], to=f, name="c2"),
             helper.make_node("Cast", ["offset"], ["of"], to=f, name="c3"),
             helper.make_node("Add", ["x", "bf"], ["a"], name="add1"),
             helper.make_node("Mul", ["a", "idf"], ["b"], name="mul"),
             helper.make_node("Add", ["b", "of"], ["c"], name="add2"),
             helper.make_node("Where", ["mask", "c", "zero"], ["d"], name="where"),
             helper.make_node("MatMul", ["d", "w"], ["y"], name="mm")]
    inputs = [helper.make_tensor_value_info("x", f, ["N", 8]),
              helper.make_tensor_value_info("bytes", TensorProto.UINT8, ["N", 8]),
              helper.make_tensor_value_info("ids", TensorProto.INT32, ["N", 1]),
              helper.make_tensor_value_info("offset", TensorProto.INT64, ["N", 1]),
              helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 8])]
    graph = helper.make_graph(nodes, "typed", inputs, [helper.make_tensor_value_info("y", f, ["N", 4])], [w, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_integer_and_bool_inputs_are_fed_in_their_dtype(tmp_path):
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((40, 8)), "bytes": rng.integers(0, 256, (40, 8)),  # float64, int64
             "ids": rng.integers(1, 4, (40, 1)), "offset": rng.integers(-3, 3, (40, 1)).astype(np.int32),
             "mask": rng.integers(0, 2, (40, 8))}
    result, comparison = quantize_and_compare(typed_inputs_model(), feeds, tmp_path)
    assert result.report["verification"]["quantized_vs_fp32_sqnr_db"]["y"] > MIN_SQNR, result.report["verification"]
    assert comparison.outputs[0]["sqnr_db"] > MIN_SQNR, comparison.outputs


def test_integers_the_input_dtype_cannot_hold_are_refused():
    from onnxflex.calib import check_calibration
    from onnxflex.errors import CalibrationError

    rng = np.random.default_rng(6)
    feeds = {"x": rng.standard_normal((4, 8)), "bytes": np.full((4, 8), 300), "ids": np.ones((4, 1)),
             "offset": np.ones((4, 1)), "mask": np.ones((4, 8))}
    with pytest.raises(CalibrationError, match=r"input 'bytes' is uint8 .* 300"):
        check_calibration(feeds, typed_inputs_model(), "test")


def test_minus1_dims_on_an_opset_12_model_with_a_reshape(tmp_path):
    """Legacy Paddle2ONNX header (-1 batch and width) on opset 12: the opset upgrade's shape inference
    must not see the -1s (it writes them, and 0s, into value_info that onnxruntime then refuses: a
    Reshape to [0, 0, -1] of a tensor declared [0, -1, ...])."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    m = numpy_helper.from_array((rng.standard_normal((32, 5)) * 0.2).astype(np.float32), "m")
    shape = numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Transpose", ["c"], ["t"], name="t", perm=[0, 3, 1, 2]),
             helper.make_node("Reshape", ["t", "shape"], ["r"], name="r"),
             helper.make_node("MatMul", ["r", "m"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8, -1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, -1, 5])], [w, m, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    x = rng.standard_normal((40, 3, 8, 12)).astype(np.float32)
    result, comparison = quantize_and_compare(model, {"x": x}, tmp_path)
    sqnr = result.report["verification"]["quantized_vs_fp32_sqnr_db"]["y"]
    assert sqnr > MIN_SQNR and comparison.outputs[0]["sqnr_db"] > MIN_SQNR, f"SQNR {sqnr:.1f} dB"
