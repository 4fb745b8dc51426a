"""bench/compare_peers.py's paired comparison: which rows it pairs and the sign test it reports
(bench_memory.sign_test_p, which bench_zoo.py reports too)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_memory  # noqa: E402  (bench/ is not a package)
import compare_peers  # noqa: E402


@pytest.mark.parametrize("wins, losses, p", [(0, 0, 1.0), (1, 4, 12 / 32), (0, 5, 2 / 32), (3, 3, 1.0),
                                             (51, 0, 2 / 2 ** 51)])
def test_sign_test_p(wins, losses, p):
    assert bench_memory.sign_test_p(wins, losses) == pytest.approx(p)
    assert bench_memory.sign_test_p(losses, wins) == pytest.approx(p)


def test_bits_of_onnxruntime_rows():
    assert compare_peers.bits_of("quantize_static MinMax U8S8") == "W8A8"
    assert compare_peers.bits_of("quantize_static Entropy S8S8") == "W8A8"
    assert compare_peers.bits_of("quantize_static Percentile W4A8 (U8, S4 weights)") == "W4A8"
    assert compare_peers.bits_of("MatMulNBits HQQ W4 weight-only g32") is None


def test_paired_counts_against_the_best_onnxruntime_row_at_the_same_bits():
    def row(toolkit, setting, right):
        right = np.array(right, dtype=bool)
        return {"model": "m", "toolkit": toolkit, "setting": setting, "metric": float(right.mean()), "right": right}

    results = [
        row("FP32", "reference", [1, 1, 1, 1, 0, 0]),
        row("onnxflex", "flexround W4A8", [1, 1, 1, 0, 1, 0]),
        row("onnxflex", "rtn W4A8", [1, 1, 1, 1, 1, 1]),  # not flexround: never paired
        row("onnxruntime", "quantize_static MinMax W4A8 (U8, S4 weights)", [1, 0, 0, 0, 0, 0]),
        row("onnxruntime", "quantize_static Entropy W4A8 (U8, S4 weights)", [1, 1, 0, 1, 0, 1]),  # the best at W4A8
        row("onnxruntime", "quantize_static MinMax U8S8", [1, 1, 1, 1, 1, 1]),  # W8A8: not a W4A8 peer
        {"model": "m", "toolkit": "onnxruntime", "setting": "quantize_static Percentile W4A8 (U8, S4 weights)",
         "error": "failed"},
    ]
    lines = compare_peers.paired(results)
    assert len(lines) == 1, lines  # no flexround W8A8 row, so no W8A8 pairing
    assert "m W4A8: flexround 0.667 against onnxruntime's best, quantize_static Entropy W4A8" in lines[0]
    # flexround alone: images 2 and 4; onnxruntime alone: images 3 and 5
    assert "flexround alone gets 2 right and onnxruntime alone 2; exact sign test p = 1." in lines[0]
    assert compare_peers.paired([r for r in results if r["toolkit"] != "onnxruntime"]) == []


def test_decoder_candidates_say_why_onnxruntime_has_no_row():
    rows = compare_peers.candidates("decoder", ["rtn", "flexround"], 32, 5, ["symmetric", "asymmetric"])
    settings = [setting for _, setting, _, _ in rows]
    assert "flexround W2 g64 symm" in settings and "rtn W3 g64 asym" in settings
    skipped = {setting: options["reason"] for _, setting, kind, options in rows if kind == "skip"}
    # no 3-bit rows from onnxruntime at all, and its GPTQ only at 4 bits; never silently dropped
    assert sorted(skipped) == sorted([f"MatMulNBits {a} W3 g64 {g}" for a, g in
                                      (("RTN", "sym"), ("RTN", "asym"), ("HQQ", "asym"), ("GPTQ", "sym"),
                                       ("GPTQ", "asym"))] +
                                     [f"MatMulNBits GPTQ W2 g64 {g}" for g in ("sym", "asym")]), skipped
    assert skipped["MatMulNBits GPTQ W2 g64 sym"] == "onnxruntime's MatMulNBitsQuantizer GPTQ takes bits 4 only"
    made = {setting: options for _, setting, kind, options in rows if kind == "ort_nbits"}
    assert made["MatMulNBits RTN W2 g64 asym"] == {"block_size": 64, "bits": 2, "symmetric": False,
                                                    "algorithm": "RTN", "samples": 32, "batch": 16}
    flex = {setting: options for _, setting, kind, options in rows if kind == "onnxflex"}
    assert flex["flexround W4 g128 symm"] == {"wbits": 4, "abits": 0, "group_size": 128, "weight_grid": "symmetric",
                                             "head_bits": 4, "method": "flexround", "calib_samples": 32, "verify_samples": 0,
                                             "iters": 5}
    assert "iters" not in flex["rtn W4 g128 asym"]


def test_decoder_pairing_takes_the_best_learned_row_per_setting():
    def row(toolkit, setting, metric, agree):
        return {"model": "decoder", "toolkit": toolkit, "setting": setting, "metric": metric,
                "right": np.array(agree, dtype=bool)}

    results = [
        row("FP32", "reference", 4.0, [1, 1, 1, 1, 1]),
        row("onnxflex", "flexround W2 g64 asym", 6.0, [1, 1, 0, 1, 0]),
        row("onnxflex", "signround W2 g64 asym", 5.5, [1, 1, 1, 0, 1]),  # the best learned row at W2
        row("onnxflex", "rtn W2 g64 asym", 7.0, [1, 0, 0, 0, 1]),
        row("onnxruntime", "MatMulNBits RTN W2 g64 sym", 6.5, [0, 1, 1, 0, 0]),
        row("onnxruntime", "MatMulNBits HQQ W2 g64 asym", 6.8, [1, 1, 1, 1, 1]),  # worse perplexity: not paired
        row("onnxflex", "flexround W3 g64 asym", 4.5, [1, 1, 1, 1, 0]),
        row("onnxflex", "rtn W3 g64 asym", 4.9, [1, 1, 0, 1, 0]),
        {"model": "decoder", "toolkit": "onnxruntime", "setting": "MatMulNBits RTN W3 g64 sym", "skipped": "no"},
    ]
    w3, w2 = compare_peers.paired_decoders(results)  # no row at all at W4: no W4 lines
    assert w2.startswith("- decoder W2 g64: signround W2 g64 asym 5.500; against onnxflex rtn's best, "
                         "rtn W2 g64 asym 7.000 (-1.500): 2 tokens agree with FP32's argmax only for signround, "
                         "0 only for rtn, exact sign test p = 0.5; against onnxruntime's best, MatMulNBits RTN W2 "
                         "g64 sym 6.500 (-1.000): 2 tokens agree with FP32's argmax only for signround, 0 only "
                         "for MatMulNBits RTN, exact sign test p = 0.5."), w2
    assert w3.endswith("p = 1; no onnxruntime row at W3 g64."), w3
    failed = {"model": "decoder", "toolkit": "onnxflex", "setting": "flexround W4 g128 asym", "error": "failed"}
    assert compare_peers.paired_decoders([failed, *results])[0] == \
        "- decoder W4 g128: no learned onnxflex row to pair (see the table)."


def test_decoder_eval_feeds_of_both_forms(tmp_path):
    ids = np.load(ROOT / "models" / "decoder" / "decoder.eval.npz")["input_ids"][:3]
    plain = compare_peers.decoder_feeds(compare_peers.DECODERS["decoder"], ids)
    genai = compare_peers.decoder_feeds(compare_peers.DECODERS["decoder_genai"], ids)
    assert "position_ids" in plain and "position_ids" not in genai  # the builder's form counts positions itself
    assert plain["position_ids"].tolist() == [list(range(64))] * 3
    assert plain["past_key_values.1.value"].shape == genai["past_key_values.1.value"].shape == (3, 2, 0, 16)


def test_decoder_rows_end_to_end(tmp_path, monkeypatch):
    """A few real rows of the builder's form: onnxflex rtn and flexround (5 steps) and onnxruntime's RTN at
    W4 g32, the skipped W3 rows, and the per-token columns the report prints."""
    monkeypatch.setattr(compare_peers, "DECODER_SETTINGS", (("W4 g32", 4, 32), ("W3 g64", 3, 64)))
    monkeypatch.setattr(compare_peers, "TIMING_REPEATS", 2)
    monkeypatch.setattr(compare_peers, "NBITS_BITS", {"RTN": (4,), "HQQ": (), "GPTQ": ()})
    rows = compare_peers.bench_model("decoder_genai", ["rtn", "flexround"], 32, 5, tmp_path, ["asymmetric"])
    by = {r["setting"]: r for r in rows}
    assert all("error" not in r for r in rows), [r["error"] for r in rows if "error" in r]
    fp32 = by["reference"]
    assert 3 < fp32["metric"] < 6 and fp32["right"].all()
    rtn, flex, ort_rtn = by["rtn W4 g32 asym"], by["flexround W4 g32 asym"], by["MatMulNBits RTN W4 g32 asym"]
    for r in (rtn, flex, ort_rtn):
        assert fp32["metric"] < r["metric"] < 1.2 * fp32["metric"], r
        assert 0 < r["kl"] < 0.1 and 0.8 < r["right"].mean() < 1, r
    assert rtn["head"] and "MatMulNBits as the rest" in compare_peers.format_row(ort_rtn)
    assert by["MatMulNBits HQQ W3 g64 asym"]["skipped"].startswith("onnxruntime's MatMulNBitsQuantizer HQQ")
    assert "not made" in compare_peers.format_row(by["MatMulNBits RTN W3 g64 sym"])
    assert by["rtn W3 g64 asym"]["metric"] > rtn["metric"]
    lines = compare_peers.paired_decoders(rows)
    assert lines[0].startswith("- decoder_genai W4 g32: flexround W4 g32 asym ") and len(lines) == 2, lines


def test_a_classifier_row_runs_in_its_child(tmp_path):
    """The child that quantizes each row, on a bundled classifier (no lm_head): it reports its time and
    peak RSS and writes the model."""
    out = tmp_path / "q.onnx"
    got = compare_peers.run_child("onnxflex", compare_peers.MODELS / "digits_cnn.onnx",
                                  compare_peers.MODELS / "digits_cnn.calib.npz", out,
                                  {"method": "rtn", "calib_samples": 16, "verify_samples": 0})
    assert out.exists() and got["seconds"] > 0 and got["peak_rss_mib"] > 0 and "head" not in got, got
