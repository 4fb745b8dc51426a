"""What a CI pipeline needs to trust a run: warnings for options that change nothing, calibration dtypes
checked against the model's, config dumps that keep what the user meant, a free-disk check for spills."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from helpers import CNN
from onnxflex.cli import main
from onnxflex.options import resolve

CALIB = CNN.with_name("digits_cnn.calib.npz")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def small_calib(tmp_path, n: int = 16, **arrays) -> str:
    path = tmp_path / "calib.npz"
    np.savez(path, **(arrays or {"input": np.load(CALIB)["input"][:n]}))
    return path


def test_patterns_that_match_nothing_are_warned_in_stderr_and_report(tmp_path):
    out = tmp_path / "q.onnx"
    result = invoke("quantize", CNN, "--method", "rtn", "--calib", small_calib(tmp_path), "-o", out,
                    "--exclude-node", "/stem/*", "--exclude-node", "/nosuch/*", "--exclude-op-type", "conv",
                    "--exclude-op-type", "Gemm", "--layer-bits", "/stage1/*=4", "--layer-bits", "Head*=4")
    assert result.exit_code == 0, result.output
    warnings = json.loads((tmp_path / "q.onnx.report.json").read_text())["warnings"]
    unmatched = [w for w in warnings if "matches no" in w or "matches none" in w or "has no conv" in w]
    assert len(unmatched) == 3, warnings
    for name in ("'/nosuch/*'", "'conv'", "'Head*'"):
        assert sum(name in w for w in unmatched) == 1, (name, unmatched)
        assert name in result.stderr, result.stderr
    assert not any(p in w for w in warnings for p in ("'/stem/*'", "'Gemm'", "'/stage1/*'")), warnings


def test_inspect_warns_on_stderr_for_an_unmatched_pattern():
    result = invoke("inspect", CNN, "--exclude-node", "stem*")
    assert result.exit_code == 0
    assert "--exclude-node 'stem*' matches no node" in result.stderr, result.stderr
    assert "matches no node" not in result.stdout


def test_int_pixels_for_a_float_input_are_refused_naming_the_input_and_the_fix(tmp_path):
    pixels = (np.load(CALIB)["input"][:16] * 255).clip(0, 255).round().astype(np.int64)
    result = invoke("quantize", CNN, "--method", "rtn", "--calib", small_calib(tmp_path, input=pixels),
                    "-o", tmp_path / "q.onnx")
    assert result.exit_code == 2, result.output
    assert "input 'input' is float32 but the data is int64 with values 0..255" in result.stderr, result.stderr
    assert "x / 255" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_a_lossless_cast_is_a_warning_in_stderr_and_report(tmp_path):
    data = np.load(CALIB)["input"][:16].astype(np.float64)
    out = tmp_path / "q.onnx"
    result = invoke("quantize", CNN, "--method", "rtn", "--calib", small_calib(tmp_path, input=data), "-o", out)
    assert result.exit_code == 0, result.output
    assert "input 'input' is float32; its float64 data was cast to float32" in result.stderr, result.stderr
    warnings = json.loads((tmp_path / "q.onnx.report.json").read_text())["warnings"]
    assert any("float64 data was cast" in w for w in warnings), warnings


def int_input_model():
    """ids int64 [N, 4] → Cast → MatMul: an integer input."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["f", "w"], ["y"])],
        "ints", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("data, message", [
    (np.array([[0.0, 1.5, 2.0, 3.0]] * 4, np.float32), "fractional values (e.g. 1.5)"),
    (np.array([[0, 1, 2, 3]] * 4, np.float32), None),
    (np.array([[0, 1, 2, 3]] * 4, np.int32), None),
])
def test_data_for_an_int_input(data, message):
    from onnxflex.calib import check_calibration
    from onnxflex.errors import CalibrationError

    model = int_input_model()
    if message:
        with pytest.raises(CalibrationError, match=r"input 'ids' is int64 but the data is float32 with "
                                                   + message.replace("(", r"\(").replace(")", r"\)")) as err:
            check_calibration({"ids": data}, model, "ids.npz")
        assert err.value.exit_code == 2 and "store the integers" in str(err.value)
    else:
        checked = check_calibration({"ids": data}, model, "ids.npz")
        assert checked.arrays["ids"].dtype == np.int64 and checked.warnings, checked.warnings
        assert np.array_equal(checked.arrays["ids"], data.astype(np.int64))


def test_int_masks_for_a_float_input_cast_with_a_warning():
    from onnxflex.calib import check_calibration
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["m"], ["y"])], "mask",
                              [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    checked = check_calibration({"m": np.array([[0, 1, -1]] * 2, np.int64)}, model, "m.npz")
    assert checked.arrays["m"].dtype == np.float32 and "int64 data was cast" in checked.warnings[0]


def test_int_pixels_for_an_input_the_graph_scales_itself_are_cast_with_a_warning():
    """An export with its preprocessing inside (x / 255, then mean/std) takes 0-255 values as float:
    integer pixels are what it expects, so they are cast, not refused; an input read by anything else
    (here a Sub of two graph values) refuses them."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxflex.calib import check_calibration
    from onnxflex.errors import CalibrationError

    def model(scaling: bool):
        nodes = [helper.make_node("Div", ["x", "k"], ["s"]), helper.make_node("Sub", ["s", "mean"], ["y"])]
        graph = helper.make_graph(nodes if scaling else [helper.make_node("Sub", ["x", "x"], ["y"])], "pre",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                                  [numpy_helper.from_array(np.array(255.0, np.float32), "k"),
                                   numpy_helper.from_array(np.array([0.5, 0.4, 0.3], np.float32), "mean")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    pixels = np.array([[0, 128, 255]] * 4, np.uint8)
    checked = check_calibration({"x": pixels}, model(True), "px.npz")
    assert checked.arrays["x"].dtype == np.float32 and "uint8 data was cast" in checked.warnings[0]
    with pytest.raises(CalibrationError, match=r"input 'x' is float32 but the data is uint8 with values 0..255"):
        check_calibration({"x": pixels}, model(False), "px.npz")


def test_a_dumped_config_keeps_defaults_so_editing_method_and_preset_takes_effect(tmp_path):
    import tomllib

    dumped = invoke("quantize", "--dump-config", "--method", "flexround", "--wbits", "4")
    assert dumped.exit_code == 0, dumped.output
    assert "iters = -1  # resolved: 400" in dumped.stdout and 'preset = "default"' in dumped.stdout, dumped.stdout
    assert tomllib.loads(dumped.stdout)["lr"] == -1
    edited = tmp_path / "edited.toml"
    edited.write_text(dumped.stdout.replace('method = "flexround"', 'method = "signround"')
                      .replace('preset = "default"', 'preset = "fast"'))
    out = tmp_path / "q.onnx"
    run = invoke("quantize", CNN, "--config", edited, "--calib", small_calib(tmp_path, 48), "-o", out,
                 "--quiet", "--device", "cpu")
    assert run.exit_code == 0, run.output
    used = json.loads((tmp_path / "q.onnx.report.json").read_text())["config"]
    # signround's 200 steps at the fast preset's quarter, its lr 1/iters, fast's early stop at a fifth
    assert (used["method"], used["preset"], used["wbits"]) == ("signround", "fast", 4), used
    assert (used["iters"], used["lr"], used["early_stop"]) == (50, 1 / 50, 10), used
    again = invoke("quantize", "--dump-config", "--config", edited)
    assert "iters = -1  # resolved: 50" in again.stdout and "early_stop = -1  # resolved: 10" in again.stdout


def test_spill_estimate_matches_what_capture_writes():
    import onnx

    from onnxflex.calib import load_npz
    from onnxflex.cache import Key, TensorCache
    from onnxflex.capture import capture
    from onnxflex.config import QuantConfig
    from onnxflex.pipeline import build_plan
    from onnxflex.spill import spill_estimate, tensor_bytes

    plan = build_plan(onnx.load(str(CNN)), resolve(QuantConfig()).plan)
    data = load_npz(CALIB, plan.model).take(0, 20)
    boundary = sorted({n for b in plan.blocks for n in b.inputs + b.outputs})
    assert set(tensor_bytes(plan.model, boundary, data)) == set(boundary), "every boundary shape is inferred"
    cache = TensorCache(0)  # everything spills
    try:
        capture(plan.model, boundary, data, cache, ["CPUExecutionProvider"])
        written = sum(cache[Key.fp(n)].nbytes for n in boundary)
    finally:
        cache.close()
    assert spill_estimate(plan.model, boundary, data, 0) == 2 * written  # the FP and quantized-run copies
    assert spill_estimate(plan.model, boundary, data, 2 * written) == 0


def test_too_little_free_disk_for_spills_is_refused_before_any_work(tmp_path, monkeypatch):
    import collections
    import tempfile

    import onnxflex.spill
    import onnxflex.stages

    usage = collections.namedtuple("usage", "total used free")
    one_mib_free = usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20)
    monkeypatch.setattr(onnxflex.spill.shutil, "disk_usage", lambda path: one_mib_free)

    def no_capture(*args, **kwargs):
        raise AssertionError("capture ran before the free-disk check")

    monkeypatch.setattr(onnxflex.stages, "capture", no_capture)
    result = invoke("quantize", CNN, "--method", "rtn", "--calib", small_calib(tmp_path, 64), "--max-cache-mb", "1",
                    "-o", tmp_path / "q.onnx")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert f"spilled to {tempfile.gettempdir()!r}" in line and "has 1 MiB free" in line, line
    assert "TMPDIR" in line and "--max-cache-mb" in line, line
    assert not (tmp_path / "q.onnx").exists()
    # with the RAM bound raised there is nothing to spill, so the same disk is enough
    monkeypatch.undo()
    ok = invoke("quantize", CNN, "--method", "rtn", "--calib", small_calib(tmp_path, 64), "-o", tmp_path / "q.onnx",
                "--quiet")
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("elem, dtype", [(TensorProto.FLOAT16, np.float16), (TensorProto.DOUBLE, np.float64)])
def test_a_model_computing_in_float16_or_double_is_bad_input_not_a_crash(tmp_path, elem, dtype):
    """Found by tests/test_fuzz.py: such models were internal errors (exit 3), in torch or, after an Add
    folded into the Gemm's bias had made its weight float32, in onnxruntime."""
    import onnx
    from onnx import helper, numpy_helper

    from onnxflex.config import QuantConfig
    from onnxflex.passes.pipeline import PassContext, run_passes

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 4)).astype(dtype), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(dtype), "b")]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["h"], name="gemm"),
                               helper.make_node("Add", ["h", "b"], ["y"], name="add")], "g",
                              [helper.make_tensor_value_info("x", elem, ["N", 16])],
                              [helper.make_tensor_value_info("y", elem, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    folded = run_passes(model, PassContext(resolve(QuantConfig()).plan))
    assert {t.data_type for t in folded.graph.initializer} == {elem}, "folding keeps the layer's float type"
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 16)).astype(dtype))
    result = invoke("quantize", tmp_path / "m.onnx", "--method", "rtn", "--calib", tmp_path / "d.npz",
                    "-o", tmp_path / "q.onnx")
    assert result.exit_code == 2, result.output
    assert f"node 'gemm' (Gemm) computes in {np.dtype(dtype).name.replace('float64', 'double')}" in result.stderr
    assert "convert the model to float32" in result.stderr and "--exclude-node gemm" in result.stderr


def test_input_shape_with_real_calibration_data_is_a_warning(tmp_path):
    out = tmp_path / "q.onnx"
    result = invoke("quantize", CNN, "--method", "rtn", "--calib", small_calib(tmp_path), "-o", out,
                    "--input-shape", "input:1x1x16x16")
    assert result.exit_code == 0, result.output
    assert "--input-shape input:1x1x16x16 shapes synthetic data only" in result.stderr, result.stderr
    warnings = json.loads((tmp_path / "q.onnx.report.json").read_text())["warnings"]
    assert any("shapes synthetic data only" in w for w in warnings), warnings
