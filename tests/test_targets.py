"""The targets table: every name the config accepts is a registered Target, and the pinned
onnxruntime-1.14 target writes opset-18 models that onnxruntime runs with integer kernels."""
from __future__ import annotations

import onnx
import pytest
from click.testing import CliRunner
from onnx import version_converter

from helpers import ROOT
from onnxflex.cli import main
from onnxflex.config import TARGETS as CONFIG_TARGETS, QuantConfig, choices
from onnxflex.errors import ConfigError
from onnxflex.graph import default_opset
from onnxflex.runtimes.targets import TARGETS, get_target

MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_cnn.calib.npz"


def test_every_registered_target_is_a_config_choice_under_its_own_name():
    assert CONFIG_TARGETS == tuple(TARGETS) and choices()["target"] == CONFIG_TARGETS
    assert all(get_target(name).name == name for name in TARGETS)
    with pytest.raises(ConfigError, match="onnxruntime-1.14"):
        QuantConfig(target="onnxruntime-1.13")  # the error lists the table's names


def test_onnxruntime_1_14_writes_opset_18_with_integer_kernels(tmp_path):
    newer = tmp_path / "cnn21.onnx"
    onnx.save(version_converter.convert_version(onnx.load(str(MODEL)), 21), str(newer))
    out = tmp_path / "cnn.q.onnx"
    run = CliRunner().invoke(main, ["quantize", str(newer), "--calib", str(CALIB), "--method", "rtn",
                                    "--target", "onnxruntime-1.14", "-o", str(out), "--quiet"])
    assert run.exit_code == 0, run.output
    emitted = onnx.load(str(out))
    assert default_opset(emitted) == 18, f"opset {default_opset(emitted)}, onnxruntime 1.14 reads up to 18"
    assert emitted.ir_version <= 8, f"IR {emitted.ir_version}: opset 18 needs no more than IR 8"
    check = CliRunner().invoke(main, ["check", str(out), "--target", "onnxruntime-1.14"])
    assert check.exit_code == 0, check.output
    assert "QLinearConv" in check.output and "FALLBACK" not in check.output, check.output


def test_onnxruntime_1_14_refuses_blocked_weights(tmp_path):
    run = CliRunner().invoke(main, ["quantize", str(MODEL), "--calib", str(CALIB), "--method", "rtn",
                                    "--target", "onnxruntime-1.14", "--wbits", "4", "--abits", "0",
                                    "--group-size", "32", "-o", str(tmp_path / "w4.onnx"), "--quiet"])
    assert run.exit_code == 2, run.output
    assert "opset 18" in run.output and "group_size=0" in run.output, run.output
