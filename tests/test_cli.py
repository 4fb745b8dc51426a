"""CLI behaviour: exit codes, error messages naming the problem, atomic output, inspect, quiet."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import CNN
from onnxflex.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "quantize" in result.output and "inspect" in result.output


def test_missing_model_is_exit_2_with_the_path(tmp_path):
    result = invoke("quantize", tmp_path / "nope.onnx", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "nope.onnx" in result.output and "does not exist" in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_not_an_onnx_file_is_exit_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    result = invoke("quantize", bad, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "bad.onnx" in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_bad_option_value_is_a_config_error(tmp_path):
    result = invoke("quantize", CNN, "--wbits", "9", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "wbits=9" in result.output and "[2, 8]" in result.output


def test_usage_error_keeps_exit_2():
    assert invoke("quantize", CNN, "--method", "magic").exit_code == 2


def quantize_with_calibration(tmp_path, **arrays):
    """Runs quantize on the bundled CNN with an .npz holding ``arrays``."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, **arrays)
    return invoke("quantize", CNN, "--calib", calib, "-o", tmp_path / "out.onnx")


def test_calibration_missing_input_names_it(tmp_path):
    result = quantize_with_calibration(tmp_path, pixels=np.zeros((8, 1, 16, 16), np.float32))
    assert result.exit_code == 2
    assert "no data for model input(s) input" in result.output and "pixels" in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_calibration_wrong_shape_names_input_and_shape(tmp_path):
    result = quantize_with_calibration(tmp_path, input=np.zeros((8, 1, 8, 8), np.float32))
    assert result.exit_code == 2
    assert "'input'" in result.output and "[?, 1, 16, 16]" in result.output


def test_calibration_nan_is_refused(tmp_path):
    x = np.zeros((8, 1, 16, 16), np.float32)
    x[3, 0, 0, 0] = np.nan
    result = quantize_with_calibration(tmp_path, input=x)
    assert result.exit_code == 2 and "NaN" in result.output


def test_quiet_rtn_run_writes_model_and_report(tmp_path):
    out = tmp_path / "sub" / "q.onnx"
    result = invoke("quantize", CNN, "--method", "rtn", "--quiet", "--no-latency-rules", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.output == ""
    report = json.loads((tmp_path / "sub" / "q.onnx.report.json").read_text())
    assert report["config"]["method"] == "rtn" and report["seed"] == 0
    assert set(report["versions"]) >= {"onnxflex", "onnx", "onnxruntime", "torch"}
    assert [b["name"] for b in report["blocks"]] == [f"block{k}" for k in range(5)]
    assert len(report["layers"]) == 9 and all(l["int_min"] >= -128 for l in report["layers"])
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")], "temporary files left"


def test_inspect_shows_the_block_plan():
    result = invoke("inspect", CNN)  # the stem (depth 9) and the 1x1 skip (depth 16) stay float
    assert result.exit_code == 0
    assert result.output.startswith("4 blocks, 7 quantizable layers"), result.output
    assert "kept float by the latency rule (reduction depth): Conv:/stem/stem.0/stem.0.0/Conv (9)" in result.output
    every = invoke("inspect", CNN, "--no-latency-rules")
    assert every.output.startswith("5 blocks, 9 quantizable layers")
    layer = invoke("inspect", CNN, "--granularity", "layer", "--no-latency-rules")
    assert layer.output.startswith("9 blocks, 9 quantizable layers")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path):
    result = invoke("quantize", CNN, "--device", "cuda", "--method", "rtn", "-o", tmp_path / "q.onnx")
    assert result.exit_code == 2
    assert "--device cuda" in result.output and "--device cpu" in result.output


def test_written_files_take_the_umask_mode(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "q.onnx"
        result = invoke("quantize", CNN, "--method", "rtn", "--quiet", "-o", out)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for path in (out, tmp_path / "q.onnx.report.json"):
        mode = path.stat().st_mode & 0o777
        assert mode == 0o644, f"{path.name} has mode {oct(mode)}, expected 0o644 under umask 022"


def test_output_that_is_the_input_or_unwritable_fails_at_once(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(CNN.read_bytes())
    same = invoke("quantize", model, "--method", "rtn", "-o", model)
    assert same.exit_code == 2 and "would overwrite the input model" in same.output, same.output
    assert model.read_bytes() == CNN.read_bytes()
    (tmp_path / "afile").write_text("x")
    bad = invoke("quantize", model, "--method", "rtn", "-o", tmp_path / "afile" / "q.onnx")
    assert bad.exit_code == 2 and "cannot write -o" in bad.output, bad.output
    assert len(bad.output.strip().splitlines()) == 1, bad.output


def test_range_messages_name_the_special_values():
    abits = invoke("quantize", "--dump-config", "--abits", "4")
    assert abits.exit_code == 2 and "0 for weight-only" in abits.output, abits.output
    iters = invoke("quantize", "--dump-config", "--iters", "-5")
    assert iters.exit_code == 2 and "iters=-5" in iters.output and "-1 (the default)" in iters.output, iters.output


def test_calib_given_a_model_says_so(tmp_path):
    result = invoke("quantize", CNN, "--calib", CNN, "--method", "rtn", "-o", tmp_path / "q.onnx")
    assert result.exit_code == 2 and "is an ONNX model, not calibration data" in result.output, result.output
    assert "pickle" not in result.output


def test_unverified_output_is_a_warning_in_stderr_and_report(tmp_path):
    calib = tmp_path / "three.npz"
    np.savez(calib, input=np.load(CNN.with_name("digits_cnn.calib.npz"))["input"][:3])
    out = tmp_path / "q.onnx"
    result = invoke("quantize", CNN, "--method", "rtn", "--calib", calib, "-o", out)
    assert result.exit_code == 0, result.output
    assert "UNVERIFIED" in result.stderr, result.stderr
    report = json.loads((tmp_path / "q.onnx.report.json").read_text())
    assert report["verification"] == {} and any("UNVERIFIED" in w for w in report["warnings"]), report["warnings"]
