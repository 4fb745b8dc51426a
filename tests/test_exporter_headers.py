"""Model headers real exporters write: dynamic batch as dim_value -1 or 0, empty or generated dim_params,
IR versions newer than the installed onnxruntime reads, integer and bool inputs. Each one quantizes
end to end and compares, or is refused in one line."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from onnxflex.calib import fixed_batch, input_dims
from onnxflex.compare import compare_models

RTN = onnxflex.QuantConfig(method="rtn")


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
    assert verification["quantized_vs_fp32_sqnr_db"]["y"] > 25, verification
    emitted = [d for vi in result.model.graph.input for d in vi.type.tensor_type.shape.dim][0]
    assert not (emitted.HasField("dim_value") and emitted.dim_value <= 0), f"emitted batch dim {emitted}"
    sqnr = comparison.outputs[0]["sqnr_db"]
    assert comparison.samples == 40 and sqnr > 25, f"compare: {comparison.samples} samples, SQNR {sqnr:.1f} dB"


def test_a_positive_dim_value_still_fixes_the_batch():
    assert fixed_batch(matmul_model(4)) == 4
