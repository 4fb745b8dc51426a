"""Quantization math: RTN error bounds, FlexRound's start and reciprocal rule, exact export, activations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxflex.rounding.activation import ActQuantizer
from onnxflex.rounding.rounders import FlexRounder, RTNRounder, make_rounder
from onnxflex.rounding.quant import signed_range


def weight(shape=(8, 4, 3, 3), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,axis", [((8, 4, 3, 3), 0), ((16, 8), 1), ((16, 8), 0), ((4, 6, 3, 3), 1)])
def test_rtn_minmax_error_is_within_half_a_step(bits, shape, axis):
    w = weight(shape)
    r = RTNRounder(w, axis, bits, "minmax")
    step = r.scale().reshape(r.shape)
    err = (r.fake_quant() - w).abs()
    assert bool((err <= step / 2 + 1e-7).all()), f"max error {float((err / step).max()):.3f} steps at {bits} bits"
    assert r.scale().shape == (shape[axis],)


@pytest.mark.parametrize("method", ["rtn", "flexround"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_export_reproduces_fake_quant_exactly(method, bits):
    r = make_rounder(method, weight(), 0, bits, "mse")
    if method == "flexround":
        with torch.no_grad():
            for p in (r.delta2, r.delta3, r.delta4):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    q = r.export()
    lo, hi = signed_range(bits)
    assert q.ints.dtype == np.int8 and q.ints.min() >= lo and q.ints.max() <= hi
    np.testing.assert_array_equal(q.dequantize(), r.fake_quant().detach().numpy())
    assert not q.zero_point.any()


def test_mse_scale_error_not_above_minmax():
    w = weight((16, 32))
    errs = {s: float(((RTNRounder(w, 0, 3, s).fake_quant() - w) ** 2).sum()) for s in ("minmax", "mse")}
    assert errs["mse"] <= errs["minmax"], errs


def test_flexround_starts_at_rtn():
    w = weight()
    assert torch.equal(FlexRounder(w, 0, 4, "mse").fake_quant(), RTNRounder(w, 0, 4, "mse").fake_quant())


def test_flexround_delta2_gradient_follows_the_reciprocal_rule():
    """∂L/∂δ2 = −(∂L/∂Ŵ)·s1·W/S: for equal upstream gradients it scales with |W| (up to the clamp)."""
    w = torch.tensor([[0.01, 0.02, 0.04, -0.08]])
    r = FlexRounder(w, 0, 8, "minmax")
    r.fake_quant().sum().backward()
    g = r.delta2.grad.abs()[0]
    ratios = (g / w.abs()[0]).tolist()
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-5), f"|grad|/|W| = {ratios}"
    assert float(g[3]) == pytest.approx(8 * float(g[0]), rel=1e-5)


def test_flexround_learns_per_input_channel_only_for_conv():
    assert FlexRounder(weight(), 0, 4).has_delta4
    assert not FlexRounder(weight((16, 8)), 1, 4).has_delta4
    groups = dict((kind, params) for params, kind in FlexRounder(weight(), 0, 4).param_groups())
    assert len(groups["lr"]) == 3 and len(groups["scale_lr"]) == 1


def test_activation_quantizer_after_relu_clips_at_zero_and_learns_its_step():
    act = ActQuantizer(8, signed=False)
    x = torch.rand(1000) * 6.0
    act.calibrate(0.0, 6.0, x, "minmax")
    assert int(act.zero_point) == 0
    assert act.export()[0] == pytest.approx(6.0 / 255, rel=1e-6)
    y = act(torch.tensor([-1.0, 0.0, 3.0, 100.0]))
    assert float(y[0]) == 0.0 and float(y[3]) == pytest.approx(255 * 6.0 / 255, rel=1e-5)
    act(x).sum().backward()
    assert act.log_scale.grad is not None and float(act.log_scale.grad) != 0.0


def test_activation_mse_search_clips_gaussian_tails_at_4_bits():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    minmax, mse = ActQuantizer(4, False), ActQuantizer(4, False)
    minmax.calibrate(float(x.min()), float(x.max()), x, "minmax")
    mse.calibrate(float(x.min()), float(x.max()), x, "mse")
    assert float(mse.scale()) < float(minmax.scale())
    assert float(((mse(x) - x) ** 2).mean()) < float(((minmax(x) - x) ** 2).mean())
