"""Symmetric and asymmetric weight grids (QuantConfig.weight_grid).

Asymmetric: q = clamp(round(W / s) + z, 0, 2^b − 1), Ŵ = s · (q − z) with a step and an integer zero point
per channel or group. ``auto`` picks it for weight-only runs at 4 bits or fewer on targets that take weight
zero points (onnxruntime), else symmetric; TensorRT refuses it. Every rounder runs on it (RTN and AdaRound
keep the start zero point, FlexRound learns it, SignRound learns a clip factor at each end, HQQ fits step and
zero point), the emitter writes blocked UINT4 (with UINT4 zero points) or per-channel uint8, and onnxruntime
fuses the blocked form into MatMulNBits with zero_points.
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import onnxflex
from onnxflex.check import check
from onnxflex.config import QuantConfig
from onnxflex.emit.pack import unpack_int4
from onnxflex.errors import ConfigError
from onnxflex.options import resolve
from onnxflex.ort import session, session_options
from onnxflex.rounding.methods import make_policy, make_rounder
from onnxflex.rounding.rounders import FrozenRounder
from onnxflex.rounding.table import METHODS
from test_exit_codes import one_line_error, run_cli
from test_weight_only import matmul_gemm_model

from helpers import MODELS


@pytest.mark.parametrize("changes, grid", [
    (dict(abits=0, wbits=4), "asymmetric"),
    (dict(abits=0, wbits=3, group_size=32), "asymmetric"),
    (dict(abits=0, wbits=4, target="onnxruntime-1.14"), "asymmetric"),
    (dict(abits=0, wbits=5), "symmetric"),
    (dict(abits=0, wbits=8), "symmetric"),
    (dict(abits=8, wbits=4), "symmetric"),
    (dict(abits=0, wbits=4, target="tensorrt"), "symmetric"),
    (dict(abits=0, wbits=4, weight_grid="symmetric"), "symmetric"),
    (dict(abits=0, wbits=8, weight_grid="asymmetric"), "asymmetric"),
])
def test_auto_picks_the_grid_per_target_and_bits(changes, grid):
    config = QuantConfig(**changes)
    assert resolve(config).rounding.weight_grid == grid, (changes, resolve(config).rounding.weight_grid)
    assert resolve(config).to_dict()["weight_grid"] == grid


@pytest.mark.parametrize("changes, message", [
    (dict(abits=0, wbits=4, target="tensorrt", weight_grid="asymmetric"), "does not take"),
    (dict(abits=8, wbits=4, weight_grid="asymmetric"), "weight-only"),
    (dict(weight_grid="skewed"), "not one of"),
])
def test_bad_grids_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**changes)


def test_tensorrt_refuses_asymmetric_with_exit_code_2(tmp_path):
    done = run_cli(tmp_path, "quantize", MODELS / "tiny_lm.onnx", "--target", "tensorrt", "--abits", "0",
                   "--wbits", "4", "--weight-grid", "asymmetric", "-o", tmp_path / "out.onnx")
    assert done.returncode == 2, done.stderr
    one_line_error(done, "weight_grid='asymmetric'", "tensorrt", "symmetric")
    assert not (tmp_path / "out.onnx").exists()


def skewed_weight(shape=(64, 32)) -> torch.Tensor:
    """A MatMul weight [K, N] whose columns are shifted off 0 by different amounts (a one-sided range)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05
    return w + torch.linspace(-0.1, 0.15, shape[1]) + 0.05 * torch.rand(shape, generator=g)


def weight_error(rounder, w) -> float:
    return float(((rounder.fake_quant().detach() - w) ** 2).sum())


@pytest.mark.parametrize("group", [0, 16])
@pytest.mark.parametrize("method", METHODS)
def test_asymmetric_grid_reconstructs_a_skewed_weight_better(method, group):
    w = skewed_weight()
    sym, asym = (make_rounder(method, w, 1, 4, "mse", group, asymmetric=a) for a in (False, True))
    e_sym, e_asym = weight_error(sym, w), weight_error(asym, w)
    print(f"\n{method} g{group}: weight squared error symmetric {e_sym:.4f}, asymmetric {e_asym:.4f}",
          file=sys.stderr)
    assert e_asym < 0.7 * e_sym, f"{method} g{group}: asymmetric {e_asym:.4f} not below 0.7 x symmetric {e_sym:.4f}"
    q = asym.export()
    assert q.ints.dtype == np.uint8 and q.zero_point.dtype == np.uint8 and q.asymmetric
    assert q.ints.max() <= 15 and q.zero_point.max() <= 15 and q.zero_point.shape == asym.init_scale.shape
    assert len(np.unique(q.zero_point)) > 1, "zero points should follow each column's offset"
    np.testing.assert_allclose(q.dequantize(), asym.fake_quant().detach().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(FrozenRounder(q).fake_quant().numpy(), q.dequantize(), rtol=0, atol=1e-6)


def test_hqq_fits_step_and_zero_point_below_rtn_in_lp_error():
    w = skewed_weight()
    w[3, :] *= 6.0  # outliers: the lp fit (p < 1) keeps them from stretching the step
    rtn, hqq = (make_rounder(m, w, 1, 4, "mse", 16, asymmetric=True) for m in ("rtn", "hqq"))
    lp = {m: float((r.fake_quant() - w).abs().pow(0.7).sum()) for m, r in (("rtn", rtn), ("hqq", hqq))}
    assert lp["hqq"] < lp["rtn"], lp
    assert not torch.equal(hqq.zero(), rtn.zero()) or not torch.equal(hqq.scale(), rtn.scale())


def _train(r, w, method: str, groups, iters: int) -> None:
    """Mutates ``r``: ``iters`` steps of ``method``'s policy on the weight's squared error."""
    options = resolve(QuantConfig(method=method, abits=0, wbits=3, iters=iters, early_stop=0)).rounding
    policy = make_policy(method, [r], groups, options)
    r.train(True)
    for it in range(iters):
        policy.zero_grad()
        loss = ((r.fake_quant() - w) ** 2).sum()
        loss.backward()
        policy.step(it, loss.item())
    policy.finish()
    r.train(False)


def test_flexround_learns_its_zero_points():
    """Zero points started 2 levels off: learning δz alone (the gradient reaches z only through the
    weights clamped at the ends of the grid) brings them back and the weight error down."""
    w = skewed_weight()
    r = make_rounder("flexround", w, 1, 3, "minmax", 16, asymmetric=True)
    good = r.init_zero.clone()
    r.init_zero.copy_((good + 2).clamp(max=r.qmax))
    start, off = weight_error(r, w), float((r.zero().detach() - good).abs().sum())
    _train(r, w, "flexround", [([r.delta_zero], "lr")], 150)
    end, off_end = weight_error(r, w), float((r.zero().detach() - good).abs().sum())
    print(f"\nflexround zero points: error {start:.4f} -> {end:.4f}, distance to the start {off:.0f} -> "
          f"{off_end:.0f}", file=sys.stderr)
    assert end < 0.8 * start and off_end < 0.5 * off, (start, end, off, off_end)
    np.testing.assert_allclose(r.export().dequantize(), r.fake_quant().detach().numpy(), rtol=0, atol=1e-6)


def test_signround_learns_both_clip_factors():
    w = skewed_weight()
    r = make_rounder("signround", w, 1, 3, "minmax", 16, asymmetric=True)
    start = weight_error(r, w)
    _train(r, w, "signround", r.param_groups(), 60)
    end = weight_error(r, w)
    assert end < start, f"signround: weight error {start:.4f} -> {end:.4f}"
    assert not torch.all(r.alpha_min == 1.0) and not torch.all(r.alpha == 1.0), "a clip factor never moved"
    assert not torch.equal(r.alpha, r.alpha_min), "the two clip factors moved together"
    np.testing.assert_allclose(r.export().dequantize(), r.fake_quant().detach().numpy(), rtol=0, atol=1e-6)


def _weight_dqs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def _optimized(model: onnx.ModelProto, path) -> onnx.ModelProto:
    session(model, ["CPUExecutionProvider"], opts=session_options(optimized_path=str(path)))
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def calib():
    return {"x": np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)}


@pytest.mark.parametrize("method", ["rtn", "flexround"])
def test_blocked_asymmetric_weights_emit_uint4_and_fuse_to_matmulnbits_with_zero_points(method, calib, tmp_path):
    config = QuantConfig(method=method, wbits=4, abits=0, group_size=16, head_bits=4, iters=20, batch_size=16,
                         verify_samples=16)  # head_bits 4: the Gemm writes the output (a head, else 8 bits)
    result = onnxflex.quantize(matmul_gemm_model(), calib, config, progress=False)
    model = result.model
    inits = {t.name: t for t in model.graph.initializer}
    dqs = _weight_dqs(model)
    assert len(dqs) == 1  # the Gemm's; the MatMul before the Relu is written as MatMulNBits (emit/nbits.py)
    for dq in dqs:
        w, s, z = (inits[name] for name in dq.input)
        assert w.data_type == TensorProto.UINT4 and z.data_type == TensorProto.UINT4, (w.data_type, z.data_type)
        assert list(z.dims) == list(s.dims), (list(z.dims), list(s.dims))
        zeros = unpack_int4(np.frombuffer(z.raw_data, np.uint8), int(np.prod(z.dims)), signed=False)
        assert zeros.max() <= 15 and len(np.unique(zeros)) > 1
    fused = [n for n in _optimized(model, tmp_path / "opt.onnx").graph.node if n.op_type == "MatMulNBits"]
    assert sorted(n.output[0] for n in fused) == ["h", "y"], [(n.op_type, list(n.output)) for n in fused]
    assert all(len(n.input) >= 4 and n.input[3] for n in fused), [list(n.input) for n in fused]  # zero_points
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 60.0, f"{method}: onnxruntime vs simulation SQNR {sim:.1f} dB < 60 dB"
    rules = {f.rule for f in check(model).findings}
    assert not rules & {"zero-point", "weight-dtype"}, f"onnxflex check flags the asymmetric weights: {rules}"
    trt = {f.rule for f in check(model, "tensorrt").findings}
    assert "weight-dtype" in trt, f"tensorrt should refuse UINT4 weights: {trt}"


def test_per_channel_asymmetric_weights_are_uint8_with_zero_points(calib):
    config = QuantConfig(method="rtn", wbits=4, abits=0, head_bits=4, verify_samples=16)
    result = onnxflex.quantize(matmul_gemm_model(), calib, config, progress=False)
    inits = {t.name: t for t in result.model.graph.initializer}
    for dq in _weight_dqs(result.model):
        w, z = numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[2]])
        assert w.dtype == np.uint8 and z.dtype == np.uint8 and w.max() <= 15, (w.dtype, z.dtype, w.max())
        assert z.shape == (w.shape[1],) and np.any(z)
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 60.0, f"onnxruntime vs simulation SQNR {sim:.1f} dB < 60 dB"
    assert all(r["int_min"] >= 0 and r["int_max"] <= 15 for r in result.report["layers"])
    rules = {f.rule for f in check(result.model).findings}
    assert not rules & {"zero-point", "weight-dtype"}, f"onnxflex check flags the asymmetric weights: {rules}"
    trt = {f.rule for f in check(result.model, "tensorrt").findings}
    assert {"zero-point", "weight-dtype"} & trt, f"tensorrt takes no weight zero points: {trt}"


def test_symmetric_grid_stays_signed_int4_without_zero_points(calib):
    config = QuantConfig(method="rtn", wbits=4, abits=0, group_size=16, head_bits=4, weight_grid="symmetric",
                         verify_samples=16)
    result = onnxflex.quantize(matmul_gemm_model(), calib, config, progress=False)
    inits = {t.name: t for t in result.model.graph.initializer}
    for dq in _weight_dqs(result.model):
        assert len(dq.input) == 2 and inits[dq.input[0]].data_type == TensorProto.INT4


def test_tiny_lm_weight_only_default_is_asymmetric_and_every_matmul_fuses(tmp_path):
    result = onnxflex.quantize(MODELS / "tiny_lm.onnx", config=QuantConfig(method="rtn", wbits=4, abits=0,
                                                                           group_size=32, verify_samples=16),
                               progress=False)
    assert result.report["config"]["weight_grid"] == "asymmetric"
    fused = [n for n in _optimized(result.model, tmp_path / "opt.onnx").graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == 25 and all(len(n.input) >= 4 and n.input[3] for n in fused), len(fused)
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["logits"]
    assert sim >= 60.0, f"onnxruntime vs simulation SQNR {sim:.1f} dB < 60 dB"


def test_asymmetric_weights_survive_a_checkpoint(tmp_path):
    """A resumed run restores uint8 integers and zero points as they were (checkpoint.py)."""
    from onnxflex.checkpoint import Checkpoint
    from onnxflex.rounding.reconstruct import BlockResult

    q = make_rounder("flexround", skewed_weight(), 1, 3, "mse", 16, asymmetric=True).export()
    folder = Checkpoint(tmp_path, {"model": "m", "config": "c", "calibration data": "d"})
    folder.save(0, "block0", BlockResult("block0", 1.0, 0.5, 10, 0.1), {"w": q}, {})
    restored = folder.load(0, "block0")["weights"]["w"]
    assert restored.asymmetric and restored.zero_point.dtype == np.uint8 and restored.block_size == 16
    np.testing.assert_array_equal(restored.zero_point, q.zero_point)
    np.testing.assert_array_equal(FrozenRounder(restored).fake_quant().numpy(), q.dequantize())


@pytest.mark.parametrize("shape, axis, group", [((1024, 600), 1, 32), ((1100, 300), 0, 0), ((96, 200), 1, 64),
                                                ((64, 40, 3, 3), 0, 0)])
def test_a_step_search_in_parts_equals_the_search_over_the_whole_weight(shape, axis, group, monkeypatch):
    """grid.in_parts splits the symmetric and asymmetric MSE searches into parts of SEARCH_CHUNK values
    along their first dim (run on one thread): every step and zero point is bit for bit the one a
    single part gives."""
    from onnxflex.rounding import grid, rounders

    monkeypatch.setattr(grid, "SEARCH_CHUNK", 4096)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen)
    view, dims, _ = rounders.grouped_view(w, axis, group)
    split = ([rounders.init_weight_scale(w, axis, bits, "mse", group) for bits in (3, 8)],
             [grid.init_asymmetric_grid(view, dims, bits, "mse") for bits in (3, 8)])
    with grid.in_parts(view, dims) as (_, spans):
        assert len(spans) > 1
    monkeypatch.setattr(grid, "SEARCH_CHUNK", view.numel())
    whole = ([rounders.init_weight_scale(w, axis, bits, "mse", group) for bits in (3, 8)],
             [grid.init_asymmetric_grid(view, dims, bits, "mse") for bits in (3, 8)])
    for a, b in zip(split[0], whole[0]):
        assert torch.equal(a, b)
    for (s1, z1), (s2, z2) in zip(split[1], whole[1]):
        assert torch.equal(s1, s2) and torch.equal(z1, z2)
