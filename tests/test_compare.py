"""`onnxflex compare`: metrics on real quantized outputs, gates with exit codes, JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import CNN, MODELS
from onnxflex.cli import main
from onnxflex.compare import compare_models

EVAL = MODELS / "digits_cnn.eval.npz"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def quantized_paths(tmp_path_factory, quantized_cnn):
    folder = tmp_path_factory.mktemp("compare")
    w8 = quantized_cnn(method="rtn").save(folder / "w8.onnx")
    w3 = quantized_cnn(method="rtn", wbits=3).save(folder / "w3.onnx")
    return w8, w3


def test_metrics_match_a_direct_computation(quantized_paths, cnn_eval, cnn_fp32_logits):
    from helpers import run_model

    w8, _ = quantized_paths
    result = compare_models(CNN, w8, EVAL, samples=200, repeats=3)
    q = run_model(w8, {"input": cnn_eval["input"][:200]})[0].astype(np.float64)
    ref = cnn_fp32_logits[:200].astype(np.float64)
    out = result.outputs[0]
    assert out["name"] == "logits" and result.samples == 200
    assert out["sqnr_db"] == pytest.approx(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - q) ** 2)), abs=1e-3)
    assert out["max_abs_error"] == pytest.approx(np.max(np.abs(ref - q)), rel=1e-5)
    assert out["top1_agreement"] == pytest.approx(np.mean(ref.argmax(1) == q.argmax(1)))
    assert 0.99 < out["cosine"] <= 1.0
    assert len(result.worst_layers) == 5
    sqnrs = [r["sqnr_db"] for r in result.worst_layers]
    assert sqnrs == sorted(sqnrs) and all(r["node"] and r["op_type"] for r in result.worst_layers)
    assert result.file_bytes["candidate"] < result.file_bytes["reference"]
    assert result.latency_ms["reference"] > 0 and result.latency_ms["candidate"] > 0


def test_gate_holds_with_exit_0(quantized_paths):
    w8, _ = quantized_paths
    result = invoke("compare", CNN, w8, "--data", EVAL, "--min-sqnr", "30", "--min-agreement", "0.97",
                    "--max-latency-ratio", "100", "--repeats", "3")
    assert result.exit_code == 0, result.output
    assert "gates: all passed" in result.stdout


def test_sqnr_gate_fails_with_exit_1_and_a_reason(quantized_paths):
    _, w3 = quantized_paths
    result = invoke("compare", CNN, w3, "--data", EVAL, "--min-sqnr", "30", "--repeats", "3")
    assert result.exit_code == 1
    assert result.stderr.startswith("gate failed: output 'logits' SQNR") and "< 30 dB" in result.stderr
    assert result.stderr.count("\n") == 1, "the reason must be one line"


def test_agreement_and_latency_gates_fail(quantized_paths):
    w8, w3 = quantized_paths
    agreement = invoke("compare", CNN, w3, "--data", EVAL, "--min-agreement", "0.999", "--repeats", "3")
    assert agreement.exit_code == 1 and "top-1 agreement" in agreement.stderr
    latency = invoke("compare", CNN, w8, "--data", EVAL, "--max-latency-ratio", "0.0001", "--repeats", "3")
    assert latency.exit_code == 1 and "latency ratio" in latency.stderr


def test_json_output_for_machines(quantized_paths):
    w8, _ = quantized_paths
    result = invoke("compare", CNN, w8, "--data", EVAL, "--json", "--samples", "64", "--repeats", "3",
                    "--min-sqnr", "1000")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["passed"] is False and data["samples"] == 64 and data["failures"]
    assert {"latency_ratio", "size_ratio", "worst_layers", "outputs", "file_bytes"} <= set(data)


def test_missing_data_and_mismatched_models_are_errors(tmp_path, quantized_paths):
    w8, _ = quantized_paths
    missing = invoke("compare", CNN, w8, "--data", tmp_path / "nope.npz")
    assert missing.exit_code == 2 and "nope.npz' does not exist" in missing.stderr
    folder = invoke("compare", CNN, w8, "--data", tmp_path)
    assert folder.exit_code == 2 and "is not a file" in folder.stderr
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((4, 1, 16, 16), np.float32))
    wrong = invoke("compare", CNN, w8, "--data", tmp_path / "wrong.npz")
    assert wrong.exit_code == 2 and "no data for model input(s) input" in wrong.stderr


@pytest.mark.parametrize("name", ["digits_vit", "tiny_lm"])
def test_transformer_compared_with_itself_is_infinite_sqnr(name):
    """Their intermediate tensors include 0-d ones (shape arithmetic), which once crashed the statistics."""
    model, data = MODELS / f"{name}.onnx", MODELS / f"{name}.eval.npz"
    result = invoke("compare", model, model, "--data", data, "--samples", "16", "--repeats", "2")
    assert result.exit_code == 0, result.output
    assert "SQNR inf dB" in result.stdout, result.stdout


def test_statistics_take_matching_infinities_and_flag_differing_ones():
    """Attention masks hold -inf: equal infinities are no error, a differing one is an infinite error."""
    from onnxflex.compare import _Stats

    ref = np.array([[1.0, -np.inf, 2.0], [np.nan, 3.0, 4.0]])
    same = _Stats()
    same.add(ref, ref.copy())
    assert same.result("t")["sqnr_db"] == float("inf") and same.result("t")["max_abs_error"] == 0.0
    differ = _Stats()
    differ.add(ref, np.where(np.isinf(ref), 0.0, ref))
    assert differ.result("t")["sqnr_db"] == float("-inf") and differ.result("t")["max_abs_error"] == float("inf")
