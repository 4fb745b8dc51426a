"""Quantization math: RTN error bounds, FlexRound's start and reciprocal rule, exact export, activations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxflex.options import resolve
from onnxflex.rounding.activation import ActQuantizer
from onnxflex.config import METHODS, QuantConfig
from onnxflex.rounding.adaround import AdaRounder
from onnxflex.rounding.methods import make_policy, make_rounder
from onnxflex.rounding.table import ROUNDERS, rounder_class
from onnxflex.errors import RegistryError
from onnxflex.rounding.rounders import FlexRounder, FrozenRounder, Rounder, RTNRounder
from onnxflex.rounding.signround import SignedDescent, SignRounder
from onnxflex.rounding.quant import signed_range
from onnxflex.emit.pack import blocked_scale_shape


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


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape,axis,group", [((64, 8), 1, 16), ((64, 8), 1, 32), ((8, 64), 0, 16)])
def test_rtn_per_group_error_is_within_half_a_group_step(bits, shape, axis, group):
    w = weight(shape)
    r = RTNRounder(w, axis, bits, "minmax", group)
    assert r.scale().shape == blocked_scale_shape(shape, 1 - axis, group)
    step = r.spread(r.scale())
    err = (r.fake_quant() - w).abs()
    assert bool((err <= step / 2 + 1e-7).all()), f"max error {float((err / step).max()):.3f} steps at {bits} bits"
    per_channel = float(((RTNRounder(w, axis, bits, "minmax").fake_quant() - w) ** 2).sum())
    assert float(((r.fake_quant() - w) ** 2).sum()) < per_channel, "groups fit the weight better than channels"


def perturb(r, seed=1):
    """Move a learned rounder's parameters off their start, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if isinstance(r, FlexRounder):
            for p in (r.delta1, r.delta2, r.delta3, r.delta4):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        elif isinstance(r, AdaRounder):
            r.v.add_(torch.randn(r.v.shape, generator=gen) * 2.0)
        elif isinstance(r, SignRounder):
            r.v.copy_(torch.rand(r.v.shape, generator=gen) - 0.5)
            r.alpha.copy_(0.5 + 0.5 * torch.rand(r.alpha.shape, generator=gen))


def test_every_method_of_the_table_loads_its_rounder():
    """ROUNDERS names its classes as "module:Class"; each must load, be a Rounder and say whether it
    learns; an unknown name lists the known ones."""
    assert METHODS == tuple(ROUNDERS) and METHODS[0] == "rtn"
    for method in METHODS:
        cls = rounder_class(method)
        assert issubclass(cls, Rounder) and isinstance(cls.reconstructs, bool), method
    with pytest.raises(RegistryError, match="unknown rounding method 'gptq'; known: adaround, flexround"):
        rounder_class("gptq")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,axis,group", [((8, 4, 3, 3), 0, 0), ((16, 8), 1, 0), ((64, 8), 1, 16),
                                              ((64, 8), 1, 32), ((8, 64), 0, 16)])
def test_export_is_in_range_and_reproduces_fake_quant_exactly(method, bits, shape, axis, group):
    """Per channel (group 0): scale [C] on ``axis``; per group: scale blocked on the input axis."""
    r = make_rounder(method, weight(shape), axis, bits, "mse", group)
    perturb(r)
    q = r.export()
    lo, hi = signed_range(bits)
    scale_shape = blocked_scale_shape(shape, 1 - axis, group) if group else (shape[axis],)
    assert q.ints.dtype == np.int8 and q.ints.shape == shape and q.scale.shape == scale_shape
    assert lo <= q.ints.min() and q.ints.max() <= hi, f"{method} W{bits}: ints in [{q.ints.min()}, {q.ints.max()}]"
    assert not r.training, "rounders start in eval mode"
    np.testing.assert_array_equal(q.dequantize(), r.fake_quant().detach().numpy())
    assert not q.zero_point.any() and q.bits == bits and q.block_size == group
    assert q.axis == (1 - axis if group else axis), "the DequantizeLinear axis: blocked on the input axis"
    frozen = FrozenRounder(q)  # what later blocks, the simulation and a resumed run compute with
    np.testing.assert_array_equal(frozen.fake_quant().numpy(), q.dequantize())


@pytest.mark.parametrize("method", [m for m in METHODS if rounder_class(m).reconstructs])
def test_per_group_learned_rounders_start_at_rtn_and_learn_per_group_steps(method):
    w = weight((64, 8))
    r = make_rounder(method, w, 1, 4, "minmax", 16)
    start, rtn = r.fake_quant().detach(), RTNRounder(w, 1, 4, "minmax", 16).fake_quant()
    if method == "signround":  # its step α · max|W| / qmax equals RTN's up to an ulp
        torch.testing.assert_close(start, rtn, rtol=1e-6, atol=0.0)
    else:
        assert torch.equal(start, rtn)
    steps = {"flexround": lambda: r.delta1, "signround": lambda: r.alpha}
    if method in steps:
        assert steps[method]().shape == (4, 8), "one learned step per (group, column)"


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
    y = act(torch.tensor([-1.0, 0.0, 3.0, 100.0])).detach()
    assert float(y[0]) == 0.0 and float(y[3]) == pytest.approx(255 * 6.0 / 255, rel=1e-5)
    act(x).sum().backward()
    assert act.log_scale.grad is not None and float(act.log_scale.grad) != 0.0


def test_activation_mse_search_clips_gaussian_tails_at_4_bits():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    minmax, mse = ActQuantizer(4, False), ActQuantizer(4, False)
    minmax.calibrate(float(x.min()), float(x.max()), x, "minmax")
    mse.calibrate(float(x.min()), float(x.max()), x, "mse")
    assert float(mse.scale().detach()) < float(minmax.scale().detach())
    assert float(((mse(x) - x) ** 2).mean().detach()) < float(((minmax(x) - x) ** 2).mean().detach())


def layer_problem(seed=0, rows=512):
    """A Gemm-like layer y = x Wᵀ with correlated inputs (where rounding to nearest is not optimal)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 32, generator=gen) * 0.1
    x = torch.randn(rows, 32, generator=gen) @ torch.randn(32, 32, generator=gen) + torch.randn(32, generator=gen)
    return w, x, x @ w.t()


def fit(r, x, y, config, on_step=None, policy=None):
    """The reconstruction loop's steps on one layer; returns the policy."""
    policy = policy or make_policy(config.method, [r], r.param_groups(), config)
    gen = torch.Generator().manual_seed(1)
    r.train()
    for it in range(config.iters):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = ((x[idx] @ r.fake_quant().t() - y[idx]) ** 2).mean()
        policy.zero_grad()
        (loss + policy.penalty(it)).backward()
        if on_step:
            on_step(it, r)
        policy.step(it, loss.item())
    policy.finish()
    r.eval()
    return policy


@torch.no_grad()
def layer_error(r, x, y):
    return float(((x @ r.fake_quant().t() - y) ** 2).mean())


@pytest.mark.parametrize("method", ["adaround", "signround"])
def test_learned_rounders_start_at_round_to_nearest(method):
    w = weight()
    assert torch.equal(make_rounder(method, w, 0, 4, "minmax").fake_quant(), RTNRounder(w, 0, 4, "minmax").fake_quant())
    if method == "adaround":  # the step is RTN's own; the signround step is α · max|W| / qmax, equal up to an ulp
        assert torch.equal(make_rounder(method, w, 0, 4, "mse").fake_quant(), RTNRounder(w, 0, 4, "mse").fake_quant())


def test_adaround_rounds_softly_only_while_training():
    w = weight((16, 8))
    r = AdaRounder(w, 0, 4, "minmax")
    r.train()
    assert torch.allclose(r.fake_quant(), w, atol=1e-6), "h(V) starts at the fractional part: soft Ŵ = W"
    r.eval()
    assert torch.equal(r.fake_quant(), RTNRounder(w, 0, 4, "minmax").fake_quant())


def test_adaround_annealed_regulariser_drives_h_to_zero_or_one():
    w, x, y = layer_problem()
    r = AdaRounder(w, 0, 4, "mse")
    config = resolve(QuantConfig(method="adaround", iters=200)).rounding
    undecided = []

    def record(it, rounder):
        if it % 50 == 0 or it == config.iters - 1:
            h = rounder.h().detach()
            undecided.append(float(((h > 0.01) & (h < 0.99)).float().mean()))

    rtn = layer_error(RTNRounder(w, 0, 4, "mse"), x, y)
    fit(r, x, y, config, record)
    print(f"AdaRound share of h in (0.01, 0.99) every 50 steps: {undecided}")
    assert undecided[0] > 0.9 and undecided[-1] < 0.1, f"h did not converge to 0/1: {undecided}"
    assert undecided[-1] < undecided[2] < undecided[1], f"not shrinking after the warm-up: {undecided}"
    ada = layer_error(r, x, y)
    assert ada < 0.9 * rtn, f"AdaRound layer error {ada:.4g} vs RTN {rtn:.4g}"
    assert r.beta(0.1) is None and r.beta(0.2) == 20.0 and r.beta(1.0) == pytest.approx(2.0)


def test_signround_steps_follow_the_linear_schedule_and_stay_in_range():
    w, x, y = layer_problem()
    r = SignRounder(w, 0, 4, "minmax")
    config = resolve(QuantConfig(method="signround", iters=50)).rounding
    assert config.lr == pytest.approx(1 / 50)
    moves = []
    previous = {}

    def record(it, rounder):
        if previous:
            moves.append(float((rounder.v - previous["v"]).abs().max().detach()))
        previous["v"] = rounder.v.detach().clone()

    policy = SignedDescent([r], r.param_groups(), config)
    assert [policy.step_size(t) for t in (0, 25, 49)] == pytest.approx([0.02, 0.01, 0.02 / 50])
    policy.keep_best = False  # judge the last state, not a restored one
    fit(r, x, y, config, record, policy)
    # the offset moved by at most the step size; while it is far from its bound, by exactly it
    expected = [policy.step_size(t) for t in range(len(moves))]
    assert all(m <= e + 1e-6 for m, e in zip(moves, expected)), (moves, expected)
    assert moves[0] == pytest.approx(expected[0], rel=1e-5)
    v, alpha = r.v.detach(), r.alpha.detach()
    assert float(v.abs().max()) <= 0.5 and 0.5 <= float(alpha.min()) and float(alpha.max()) <= 1.0


def test_best_loss_restore_returns_the_best_state():
    r = SignRounder(weight((4, 8)), 0, 4, "minmax")
    policy = SignedDescent([r], r.param_groups(), resolve(QuantConfig(method="signround", iters=5)).rounding)
    states = []
    for it, loss in enumerate([3.0, 2.0, 0.5, 1.0, 4.0]):
        states.append((r.v.detach().clone(), r.alpha.detach().clone()))
        policy.zero_grad()
        (r.fake_quant() * torch.randn(r.weight.shape, generator=torch.Generator().manual_seed(it))).sum().backward()
        policy.step(it, loss)
    assert not torch.equal(r.v, states[2][0])
    policy.finish()
    assert policy.best_iter == 2 and policy.best_loss == 0.5
    assert torch.equal(r.v, states[2][0]) and torch.equal(r.alpha, states[2][1])


def test_method_defaults_resolve_in_the_config():
    def rounding(**options):
        return resolve(QuantConfig(**options)).rounding

    assert (rounding(method="signround").iters, rounding(method="signround").lr) == (200, 1 / 200)
    assert rounding(method="signround", iters=400).lr == 1 / 400
    assert rounding(method="signround", iters=50, lr=0.01).lr == 0.01
    assert (rounding(method="flexround").iters, rounding(method="flexround").lr) == (400, 3e-3)
    assert rounding(method="adaround").lr == 0.1
    assert "iters = 200" in resolve(QuantConfig(method="signround")).to_toml()


@pytest.mark.parametrize("shape,axis,group", [((64, 8), 1, 16), ((8, 64), 0, 32), ((48, 8), 1, 32), ((16, 8), 1, 0)])
def test_frozen_asymmetric_weights_compute_what_the_dequantize_linear_does(shape, axis, group):
    """FrozenRounder broadcasts each block's step and zero point over the block (a divisible axis) or
    spreads them (a short last block, per channel); both give DequantizeLinear's (q − z) · s exactly."""
    q = make_rounder("rtn", weight(shape), axis, 4, "mse", group, True).export()
    assert q.asymmetric and q.zero_point.any()
    np.testing.assert_array_equal(FrozenRounder(q).fake_quant().numpy(), q.dequantize())


def test_a_frozen_rounder_takes_read_only_integers_without_a_warning_or_a_copy():
    """File-backed integers and a Ray object's arrays are read-only: the frozen rounder reads them in place,
    and torch's warning about writing to them (nothing does) does not reach the user. In a fresh process:
    torch gives that warning once per process, so an earlier test's would hide it."""
    import subprocess
    import sys

    script = """
import warnings
import numpy as np
from onnxflex.qparams import QuantizedWeight
from onnxflex.rounding.rounders import FrozenRounder

ints = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
scale, zero = np.full(4, 0.5, np.float32), np.zeros(4, np.int8)
for a in (ints, scale, zero):
    a.flags.writeable = False
with warnings.catch_warnings():
    warnings.simplefilter("error")
    frozen = FrozenRounder(QuantizedWeight(ints, scale, zero, axis=0, bits=8))
assert np.shares_memory(frozen.ints.numpy(), ints)
np.testing.assert_array_equal(frozen.fake_quant().numpy(), ints.astype(np.float32) * 0.5)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
