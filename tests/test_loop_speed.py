"""The loop-speed helpers: the in-place activation MSE error equals the out-of-place formula bit for bit,
and bench/loop_speed.py's FLOP counting and ratio."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from onnxflex.rounding.activation import CLIP_GRID, ActQuantizer, _clip_error

ROOT = Path(__file__).resolve().parents[1]


def _out_of_place(sample, s, z, qmin, qmax):
    q = torch.clamp(torch.round(sample / s) + z, qmin, qmax)
    return float(((q - z) * s - sample).pow(2).mean())


@pytest.mark.parametrize("signed", [True, False])
def test_clip_error_in_place_equals_the_out_of_place_form_exactly(signed):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(3)) * 2.5
    if not signed:
        x = x.relu()
    act = ActQuantizer(8, signed)
    lo, hi = float(x.min()), float(x.max())
    work = torch.empty_like(x)
    for ratio in CLIP_GRID.tolist():
        s, z = act._grid_point(lo, hi, ratio)
        expected = _out_of_place(x, s, z, act.qmin, act.qmax)
        got = _clip_error(x, s, z, act.qmin, act.qmax, work)
        assert got == expected, f"ratio {ratio}: in-place {got!r} != out-of-place {expected!r}"


def _bench():
    spec = importlib.util.spec_from_file_location("loop_speed", ROOT / "bench" / "loop_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loop_speed_ratio_and_flop_rate():
    bench = _bench()
    rate = bench.flop_rate(1, repeats=1)
    assert rate > 1e8, f"measured {rate:.3g} FLOP/s"
    record = {"steps": 10, "seconds": 1.0, "flops": 1e6, "batch": 10, "kind": "Conv x1"}
    # 100 ms a step for 1e7 FLOP at 1e9 FLOP/s (10 ms): 10x
    assert bench.ratio(record, 1e9) == pytest.approx(10.0)
    assert "| Conv x1 | 1 | 1.0 | 100.0 | 10.00 | 10.0, 10.0 |" in bench.table([record], 1e9)


def test_instrument_times_each_loop_by_the_clock_it_is_given(monkeypatch):
    """--cpu-time passes time.process_time: the record's seconds are that clock's, FLOPs from a forward."""
    import types

    import onnxflex.rounding.reconstruct as rec

    bench = _bench()
    ticks = iter([10.0, 12.5])
    monkeypatch.setattr(rec, "train", lambda module, data, config, seed, progress: 5)
    weight = torch.randn(8, 4)
    data = types.SimpleNamespace(num_samples=6, device=torch.device("cpu"), q_inputs={"x": torch.randn(6, 4)},
                                 run=lambda module, feeds: {"y": feeds["x"] @ weight.T})
    module = types.SimpleNamespace(block=types.SimpleNamespace(name="b0", layers=[]))
    records: list[dict] = []
    undo = bench.instrument(records, clock=lambda: next(ticks))
    try:
        assert rec.train(module, data, types.SimpleNamespace(batch_size=4), 0, None) == 5
    finally:
        undo()
    assert records[0]["seconds"] == 2.5 and records[0]["steps"] == 5, records
    assert records[0]["flops"] == 3 * 2 * 4 * 8, records  # 3x the forward's 2·4·8 per sample
