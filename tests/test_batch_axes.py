"""Inputs whose samples are not on axis 0 (recurrent state[2, N, H]), unbatched inputs (a 0-d sample
rate) and pinned ones (--fix-input): calibration, capture, reconstruction and verification take the
model's layout as it is."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from onnxflex.calib import check_calibration
from onnxflex.inputs import InputOptions
from onnxflex.compare import compare_models
from onnxflex.errors import CalibrationError

N = 64
MIN_SQNR = 15.0  # W8A8 on 8x4/4x4 MatMuls, 48 calibration samples: 25-40 dB; a misplaced batch axis: < 5


def streaming_model(state_dims=(2, "N", 4)) -> onnx.ModelProto:
    """x[N, 8], state[2, N, 4] (batch on axis 1), sr 0-d int64:
    s = (state @ W2 + x @ W1) * (sr / 16000) → state_out[2, N, 4];  y = mean_0(s) @ W3 → y[N, 3]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (8, 4)), ("w2", (4, 4)), ("w3", (4, 3)))]
    inits.append(numpy_helper.from_array(np.array(16000.0, np.float32), "rate"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm_x"),
             helper.make_node("MatMul", ["state", "w2"], ["s"], name="mm_state"),
             helper.make_node("Add", ["s", "h"], ["s2"], name="add"),
             helper.make_node("Cast", ["sr"], ["srf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Div", ["srf", "rate"], ["gain"], name="div"),
             helper.make_node("Mul", ["s2", "gain"], ["state_out"], name="mul"),
             helper.make_node("ReduceMean", ["state_out"], ["m"], name="mean", axes=[0], keepdims=0),
             helper.make_node("MatMul", ["m", "w3"], ["y"], name="mm_out")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, list(state_dims)),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
               helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "N", 4])]
    model = helper.make_model(helper.make_graph(nodes, "streaming", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def feeds(n: int = N, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 8)).astype(np.float32),
            "state": rng.standard_normal((2, n, 4)).astype(np.float32), "sr": np.array(16000, np.int64)}


def fp32_outputs(model, data):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(["y", "state_out"], sess.run(["y", "state_out"], data)))


def check_result(result, name: str) -> None:
    verification = result.report["verification"]
    sim, fp32 = verification["onnxruntime_vs_simulation_sqnr_db"], verification["quantized_vs_fp32_sqnr_db"]
    assert verification["samples"] == 16 and set(fp32) == {"y", "state_out"}, verification
    assert min(sim.values()) > 40, f"{name}: onnxruntime vs simulation {sim}"
    assert min(fp32.values()) > MIN_SQNR, f"{name}: quantized vs FP32 {fp32}"


@pytest.mark.parametrize("method", ["rtn", "flexround"])
def test_state_on_axis_1_and_a_0d_input_quantize_end_to_end(method):
    config = onnxflex.QuantConfig(method=method, iters=20, batch_size=16)
    data = check_calibration(feeds(), streaming_model(), "test")
    assert data.layout.axis("state") == 1 and data.layout.shared("sr"), data.layout
    assert data.arrays["state"].shape == (N, 2, 4) and "sr" in data.shared
    np.testing.assert_array_equal(data.feeds(3, 5)["state"], feeds()["state"][:, 3:5])
    check_result(onnxflex.quantize(streaming_model(), feeds(), config, progress=False), method)


def test_ambiguous_batch_axis_names_the_flag_and_the_flag_resolves_it():
    model = streaming_model(state_dims=("D", "N", 4))
    square = {**feeds(), "state": np.zeros((N, N, 4), np.float32)}
    with pytest.raises(CalibrationError, match=r"input 'state'.*--batch-axis state=AXIS") as err:
        check_calibration(square, model, "test")
    assert "\n" not in str(err.value)
    assert check_calibration(square, model, "test", InputOptions(batch_axes={"state": 1})).layout.axis("state") == 1
    config = onnxflex.QuantConfig(method="rtn", batch_axes=("state=1",))
    check_result(onnxflex.quantize(model, feeds(), config, progress=False), "--batch-axis state=1")


def test_state_samples_on_axis_0_are_refused_with_the_flag():
    bad = {**feeds(), "state": np.zeros((N, 2, 4), np.float32)}
    with pytest.raises(CalibrationError, match=r"dim 0 differs|--batch-axis"):
        check_calibration(bad, streaming_model(), "test")


def test_a_0d_input_given_as_n_identical_values_or_pinned():
    stacked = {**feeds(), "sr": np.full(N, 16000, np.int64)}
    assert check_calibration(stacked, streaming_model(), "test").shared["sr"].shape == ()
    with pytest.raises(CalibrationError, match=r"'sr'.*different values.*--fix-input sr=VALUE"):
        check_calibration({**stacked, "sr": np.arange(N)}, streaming_model(), "test")
    no_sr = {k: v for k, v in feeds().items() if k != "sr"}
    config = onnxflex.QuantConfig(method="rtn", fix_inputs=("sr=16000",))
    result = onnxflex.quantize(streaming_model(), no_sr, config, progress=False)
    check_result(result, "--fix-input sr=16000")
    assert [i.name for i in result.model.graph.input] == ["x", "state", "sr"]
    pinned = check_calibration(no_sr, streaming_model(), "test", InputOptions(fixed={"sr": 16000.0}))
    assert pinned.shared["sr"].dtype == np.int64 and int(pinned.shared["sr"]) == 16000


def test_feed_dicts_join_along_the_state_axis():
    whole = feeds()
    reader = [{"x": whole["x"][i:i + 8], "state": whole["state"][:, i:i + 8], "sr": whole["sr"]}
              for i in range(0, N, 8)]
    result = onnxflex.quantize(streaming_model(), reader, onnxflex.QuantConfig(method="rtn"), progress=False)
    check_result(result, "feed dicts")


def test_compare_takes_the_state_layout(tmp_path):
    model = streaming_model()
    onnx.save(model, tmp_path / "m.onnx")
    result = onnxflex.quantize(model, feeds(), onnxflex.QuantConfig(method="rtn"), progress=False)
    result.save(tmp_path / "q.onnx")
    np.savez(tmp_path / "eval.npz", **feeds(32, seed=5))
    comparison = compare_models(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "eval.npz", repeats=1, worst=0)
    by_name = {o["name"]: o for o in comparison.outputs}
    assert comparison.samples == 32 and min(o["sqnr_db"] for o in by_name.values()) > MIN_SQNR, by_name
    ref = fp32_outputs(model, feeds(32, seed=5))["state_out"]
    assert by_name["state_out"]["max_abs_error"] < 0.2 * np.abs(ref).max(), by_name["state_out"]
