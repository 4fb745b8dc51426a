"""AdaRound and SignRound on the bundled CNN at W4A8: both beat round-to-nearest, and the emitted
model matches the torch simulation. 100 iterations per block keep each run to seconds."""
from __future__ import annotations

import pytest

from helpers import agreement, run_model, top1
from onnxflex.qparams import sqnr_db

ITERS = 100


@pytest.mark.parametrize("method", ["adaround", "signround"])
def test_learned_rounder_beats_rtn_at_w4a8(quantized_cnn, cnn_eval, cnn_fp32_logits, method):
    rtn = quantized_cnn(method="rtn", wbits=4, abits=8)
    learned = quantized_cnn(method=method, wbits=4, abits=8, iters=ITERS)
    rtn_out = run_model(rtn.model, {"input": cnn_eval["input"]})[0]
    out = run_model(learned.model, {"input": cnn_eval["input"]})[0]
    rtn_db, db = sqnr_db(cnn_fp32_logits, rtn_out), sqnr_db(cnn_fp32_logits, out)
    rtn_top1, q_top1 = top1(rtn_out, cnn_eval["labels"]), top1(out, cnn_eval["labels"])
    # agreement with FP32's predictions: with 4-bit biases corrected, RTN's top-1 on the labels lies
    # within a few of 500 images of FP32's, where a label count is luck more than fidelity
    rtn_agree, q_agree = agreement(rtn_out, cnn_fp32_logits), agreement(out, cnn_fp32_logits)
    seconds = learned.report["timings"]["reconstruct"]
    print(f"W4A8 {method} ({ITERS} iters, {seconds:.1f} s): top-1 {q_top1:.2f}%, agreement with FP32 "
          f"{q_agree:.3f}, SQNR {db:.1f} dB; RTN: top-1 {rtn_top1:.2f}%, agreement {rtn_agree:.3f}, "
          f"SQNR {rtn_db:.1f} dB")
    assert db >= rtn_db + 3.0, f"W4A8 output SQNR: {method} {db:.1f} dB vs RTN {rtn_db:.1f} dB"
    one = 1.0 / len(out)  # RTN now misses 1 of 500: a learned row may miss one more, not two
    assert q_agree >= rtn_agree - one - 1e-9, \
        f"W4A8 agreement with FP32: {method} {q_agree:.3f} < RTN {rtn_agree:.3f} by more than one image"
    for block in learned.report["blocks"]:
        assert block["iters"] == ITERS and block["loss_after"] <= block["loss_before"], block
    sim = learned.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["logits"]
    assert sim >= 35.0, f"{method}: onnxruntime vs torch simulation SQNR {sim:.1f} dB < 35 dB"
