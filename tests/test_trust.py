"""What a CI pipeline needs to trust a run: warnings for options that change nothing, calibration dtypes
checked against the model's, config dumps that keep what the user meant, a free-disk check for spills."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import CNN
from onnxflex.cli import main

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
