"""Verification of the emitted model against the torch simulation: where the two part, what is kept
when they do, and where the comparison is made.

A simulation error is planted by replacing one converter for one node (the Sigmoid of the third of
four Conv+Sigmoid blocks doubles its output), so the torch side computes something onnxruntime does not.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from onnxflex.cli import main
from onnxflex.config import QuantConfig
from onnxflex.divergence import BlockComparison, Divergence, comparison_points
from onnxflex.errors import VerificationError
from onnxflex.rounding.converters import registry
from onnxflex.verify import Verification

PLANTED = "s2"  # the Sigmoid output the planted converter doubles


def conv_stack(layers: int = 4, seed: int = 0, center: float | None = None):
    """``layers`` × (Conv 3x3 → Sigmoid) on x[N, 3, 8, 8]; tensor s{k} is layer k's Sigmoid output.
    With ``center``, the output is the last Sigmoid's minus ``center`` (tensor "centered")."""
    rng = np.random.default_rng(seed)
    inits, nodes, x, c = [], [], "x", 3
    for k in range(layers):
        inits += [numpy_helper.from_array((rng.standard_normal((8, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32),
                                          f"w{k}"),
                  numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), f"b{k}")]
        nodes += [helper.make_node("Conv", [x, f"w{k}", f"b{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("Sigmoid", [f"c{k}"], [f"s{k}"], name=f"sig{k}")]
        x, c = f"s{k}", 8
    if center is not None:
        inits.append(numpy_helper.from_array(np.array(center, np.float32), "center"))
        nodes.append(helper.make_node("Sub", [x, "center"], ["centered"], name="centering"))
        x = "centered"
    graph = helper.make_graph(nodes, "conv_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def calibration(n: int = 48) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32)}


@pytest.fixture
def planted(monkeypatch):
    """The Sigmoid converter, wrong for the node writing PLANTED."""
    def wrong(node, inputs):
        y = torch.sigmoid(inputs[0])
        return (2 * y if node.outputs[0] == PLANTED else y,)

    monkeypatch.setitem(registry._CONVERTERS, "Sigmoid", [(1, wrong)])


def test_planted_divergence_names_the_block_and_keeps_the_result(planted):
    with pytest.raises(VerificationError) as caught:
        onnxflex.quantize(conv_stack(), calibration(), QuantConfig(method="rtn", latency_rules=False),  # block names
                          progress=False)
    message, result = str(caught.value), caught.value.result
    assert result is not None and "block2" in message and repr(PLANTED) in message, message
    assert "local" in message and "\n" not in message, message
    verification = result.report["verification"]
    assert verification["passed"] is False and verification["onnxruntime_vs_simulation_sqnr_db"]["s3"] < 30
    found = verification["divergence"]
    assert (found["first_block"], found["first_tensor"], found["first_kind"]) == ("block2", PLANTED, "local"), found
    rows = {b["block"]: b for b in found["blocks"]}
    assert rows["block2"]["local_tensor"] == PLANTED and f"at {PLANTED!r})" in message, (rows["block2"], message)
    assert rows["block0"]["chained_sqnr_db"] >= 30 and rows["block1"]["chained_sqnr_db"] >= 30, rows
    # the block after it is simulated right: fed onnxruntime's input it agrees, only its chained value differs
    assert rows["block3"]["local_sqnr_db"] >= 30 > rows["block3"]["chained_sqnr_db"], rows["block3"]
    # exposing the block outputs (as QuantizeLinear integers) leaves onnxruntime's outputs as they were
    assert found["probed_outputs_vs_plain_sqnr_db"]["s3"] >= 100, found
    assert not found["blocks_agree"]


def test_cli_keeps_a_failed_model_as_unverified(planted, tmp_path):
    model, data, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "m.q.onnx"
    model.write_bytes(conv_stack().SerializeToString())
    np.savez(data, **calibration())
    done = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out), "--calib", str(data), "--method", "rtn",
                                     "--quiet", "--no-latency-rules"])
    kept = tmp_path / "m.q.unverified.onnx"
    assert done.exit_code == 1, (done.exit_code, done.output)
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(kept) in lines[0] and f"{kept}.report.json" in lines[0], done.output
    assert "block2" in lines[0] and PLANTED in lines[0], lines[0]
    assert not out.exists() and kept.is_file()
    report = json.loads((tmp_path / "m.q.unverified.onnx.report.json").read_text())
    assert report["verification"]["divergence"]["first_block"] == "block2", report["verification"]
    ort.InferenceSession(str(kept), providers=["CPUExecutionProvider"]).run(None, {"x": calibration(2)["x"]})


def test_an_agreeing_model_passes_with_verification_figures(tmp_path):
    result = onnxflex.quantize(conv_stack(), calibration(), QuantConfig(method="rtn"), progress=False)
    verification = result.report["verification"]
    assert verification["passed"] is True and "divergence" not in verification, verification
    assert verification["onnxruntime_vs_simulation_sqnr_db"]["s3"] >= 30, verification


def _divergence(*rows: tuple[float, float | None]) -> Divergence:
    blocks = tuple(BlockComparison(f"b{k}", ("Conv",), f"t{k}", chained, local) for k, (chained, local) in enumerate(rows))
    return Divergence(8, 30.0, blocks, {"y": float("inf")})


def test_chained_flips_pass_with_a_warning_when_every_block_agrees():
    """Each block fed onnxruntime's inputs agrees; the outputs part only because a rounding flip early on
    grows from block to block: that model is right, and passes with a warning saying so."""
    found = _divergence((75.0, 75.0), (50.0, float("inf")), (28.0, float("inf")))
    assert found.blocks_agree and found.first.block == "b2" and found.first_local is None
    assert "from upstream" in found.summary(), found.summary()
    verification = Verification(8, {"y": 27.0}, {"y": 31.0}, {}, 30.0, divergence=found.to_dict(),
                                divergence_summary=found.summary(), blocks_agree=found.blocks_agree)
    assert verification.failure() is None and "rounding flips" in verification.chained_warning()
    assert verification.to_dict()["passed"] is True


def test_a_block_that_differs_alone_fails_even_behind_chained_blocks():
    found = _divergence((75.0, 75.0), (29.0, 60.0), (20.0, 21.0))
    assert not found.blocks_agree and (found.first.block, found.first_local.block) == ("b1", "b2")
    summary = found.summary()
    assert "'b1'" in summary and "from upstream" in summary and "'b2'" in summary, summary
    verification = Verification(8, {"y": 19.0}, {"y": 31.0}, {}, 30.0, divergence=found.to_dict(),
                                divergence_summary=summary, blocks_agree=False)
    assert verification.failure() and verification.chained_warning() is None


def softmax_head(logit_scale: float):
    """x[N, 16] → MatMul → Add → Softmax: the probabilities saturate for a large ``logit_scale``."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((16, 10)) * logit_scale / 4).astype(np.float32)
    b = (rng.standard_normal(10) * 0.1).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["logits"], name="add"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_softmax_output_is_compared_at_its_logits():
    model = softmax_head(40.0)
    assert comparison_points(model) == {"probs": "logits"}
    data = {"x": np.random.default_rng(3).standard_normal((48, 16)).astype(np.float32)}
    result = onnxflex.quantize(model, data, QuantConfig(method="rtn"), progress=False)
    verification = result.report["verification"]
    assert verification["simulation_compared_at"] == {"probs": "logits"}, verification
    sim = verification["onnxruntime_vs_simulation_sqnr_db"]["probs"]
    assert sim >= 30, f"ORT vs simulation at the logits {sim:.1f} dB < 30 dB"


def tiny_channel_conv():
    """Conv whose first 4 output channels have weights around 1e-6 (so a weight step around 1e-8) and a
    bias of 1: bias / (s_x · s_w) is far past int32 (channels like these come from BatchNorm folding
    with a near-zero γ)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    w[:4] = np.abs(w[:4]) * 1e-6
    b = (rng.standard_normal(8) * 0.1).astype(np.float32)
    b[:4] = 1.0
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                              "tiny_channels", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), \
        {"x": rng.uniform(0, 1, (48, 4, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("method", ["rtn", "flexround", "adaround", "signround"])
def test_an_int32_bias_that_would_overflow_gets_a_larger_weight_step(method):
    """Without room, the int32 bias is clamped at 2**31 and onnxruntime's int32 accumulator wraps when
    the weighted sum is added (the simulation does not: about 20 dB between them); clamped with room for
    the sum they agree but the clamped channels lose their bias (about 9 dB against FP32). Raising those
    channels' weight step until the bias fits keeps both."""
    model, data = tiny_channel_conv()
    result = onnxflex.quantize(model, data, QuantConfig(method=method, iters=8, batch_size=8), progress=False)
    verification = result.report["verification"]
    sim, fp32 = verification["onnxruntime_vs_simulation_sqnr_db"]["y"], verification["quantized_vs_fp32_sqnr_db"]["y"]
    assert sim >= 30, f"ORT vs simulation {sim:.1f} dB < 30 dB ({method})"
    assert fp32 >= 30, f"quantized vs FP32 {fp32:.1f} dB < 30 dB ({method})"


def test_a_bias_clamped_anyway_is_clamped_with_room_and_a_warning(caplog):
    """With the weight steps frozen at their tiny values, the bias is clamped below 2**31 by the
    accumulator's room, so onnxruntime and the simulation still agree, and the clamp is warned about."""
    caplog.set_level(logging.WARNING, logger="onnxflex")
    from onnxflex.rounding import reconstruct

    model, data = tiny_channel_conv()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconstruct, "make_room_for_biases", lambda block, state: None)
        result = onnxflex.quantize(model, data, QuantConfig(method="rtn"), progress=False)
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 30, f"ORT vs simulation {sim:.1f} dB < 30 dB"
    assert any("bias 'b': 4 channel(s)" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("nudge, passes", [(1e-3, True), (1e-2, False)])
def test_a_small_local_difference_carried_downstream_passes_a_large_one_fails(monkeypatch, nudge, passes):
    """The first Sigmoid is nudged by ``nudge`` (relative) in the simulation only; the centred output
    (the last Sigmoid minus its mean) turns the flips it causes downstream into a lower output SQNR
    than any block shows. At 1e-3 the nudged block agrees within the tolerance (about 52 dB, output
    about 46 dB): the run passes with the chained warning; at 1e-2 (about 39 dB) the block fails it."""
    def nudged(node, inputs):
        y = torch.sigmoid(inputs[0])
        return (y * (1 + nudge) if node.outputs[0] == "s0" else y,)

    monkeypatch.setitem(registry._CONVERTERS, "Sigmoid", [(1, nudged)])
    config = QuantConfig(method="rtn", verify_tolerance_db=48.0)
    if passes:
        result = onnxflex.quantize(conv_stack(center=0.449), calibration(), config, progress=False)
        verification = result.report["verification"]
        sim = verification["onnxruntime_vs_simulation_sqnr_db"]["centered"]
        assert sim < 48 and verification["passed"] and verification["divergence"]["blocks_agree"], verification
        assert any("rounding flips" in w for w in result.report["warnings"]), result.report["warnings"]
    else:
        with pytest.raises(VerificationError, match="'block0'") as caught:
            onnxflex.quantize(conv_stack(center=0.449), calibration(), config, progress=False)
        assert caught.value.result.report["verification"]["divergence"]["first_local_block"] == "block0"


def test_a_failure_the_blocks_cannot_localize_still_carries_its_result(planted, monkeypatch):
    import onnxflex.divergence

    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(onnxflex.divergence, "locate", broken)
    with pytest.raises(VerificationError, match="could not run .RuntimeError: planted") as caught:
        onnxflex.quantize(conv_stack(), calibration(), QuantConfig(method="rtn"), progress=False)
    assert caught.value.result is not None and caught.value.result.report["verification"]["passed"] is False
