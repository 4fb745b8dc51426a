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
