"""RepQuant-style LayerNorm reparameterization (passes/ln_reparam.py, the refine stage's layernorm_folding).

The fold is exact before quantization (the bundled ViT and LM, the op and decomposed forms, MatMul and
Gemm readers), it is refused where a reader could not absorb it, the emitted model keeps per-tensor
activation steps, and on a LayerNorm with outlier channels it lifts W8A8 accuracy well above the
per-tensor quantizer's.
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, parser

import onnxflex
from helpers import MODELS, run_model
from onnxflex.calib import CalibrationSet, load_npz
from onnxflex.config import QuantConfig
from onnxflex.options import resolve
from onnxflex.passes.ln_reparam import find_layernorm_folds, fold_factors, fold_layernorms
from onnxflex.pipeline import build_plan

CPU = ["CPUExecutionProvider"]
C = 16


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()))


def with_inits(text: str, **arrays: np.ndarray) -> onnx.ModelProto:
    model = parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items())
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def layernorm_model(gamma: np.ndarray, seed: int = 0, balanced: bool = False) -> onnx.ModelProto:
    """x [N, 4, C] → LayerNormalization → two MatMul + bias readers (and a Shape reader). ``balanced``:
    the readers' weight rows shrink by γ, so every channel adds alike to the outputs (as trained
    transformers do with their outlier channels)."""
    rng = np.random.default_rng(seed)
    rows = 1.0 / gamma[:, None] if balanced else 1.0
    return with_inits(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, {C}] x) => (float[N, 4, 8] a, float[N, 4, 8] b, int64[3] s) {{
            y = LayerNormalization <axis = -1> (x, gamma, beta)
            s = Shape (y)
            ma = MatMul (y, wa)
            a = Add (ma, ba)
            mb = MatMul (y, wb)
            b = Add (bb, mb)
        }}""", gamma=gamma, beta=rng.normal(0, 1, C), wa=rng.normal(0, 0.3, (C, 8)) * rows, ba=rng.normal(0, 1, 8),
        wb=rng.normal(0, 0.3, (C, 8)) * rows, bb=rng.normal(0, 1, 8))


def decomposed_gemm_model(seed: int = 1) -> onnx.ModelProto:
    """x [N, C] → ReduceMean/Sub/Pow/Sqrt/Div LayerNorm → Mul(γ) → Add(β) → Gemm (transB, alpha, beta)."""
    rng = np.random.default_rng(seed)
    return with_inits(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {C}] x) => (float[N, 8] z) {{
            mu = ReduceMean <axes = [-1]> (x)
            d = Sub (x, mu)
            two = Constant <value = float {{2.0}}> ()
            sq = Pow (d, two)
            var = ReduceMean <axes = [-1]> (sq)
            eps = Constant <value = float {{1e-5}}> ()
            ve = Add (var, eps)
            sd = Sqrt (ve)
            n = Div (d, sd)
            ng = Mul (n, gamma)
            y = Add (ng, beta)
            z = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (y, w, c)
        }}""", gamma=rng.normal(1, 0.5, C) * np.where(np.arange(C) < 2, 10.0, 1.0), beta=rng.normal(0, 1, C),
        w=rng.normal(0, 0.3, (8, C)), c=rng.normal(0, 1, 8))


def calibration(model: onnx.ModelProto, n: int = 64, seed: int = 2) -> CalibrationSet:
    dims = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).normal(0.5, 2.0, dims).astype(np.float32)
    return CalibrationSet({model.graph.input[0].name: x}, "test")


def folded_copy(model: onnx.ModelProto, data: CalibrationSet) -> tuple[onnx.ModelProto, onnx.ModelProto, list]:
    """(canonical model before the fold, after it, report rows); the plan given is left unchanged."""
    plan = build_plan(model, resolve(QuantConfig()).plan)
    before = plan.model.SerializeToString()
    folded, rows = fold_layernorms(plan, data, CPU)
    assert plan.model.SerializeToString() == before, "fold_layernorms changed the plan it was given"
    assert (folded.model is plan.model) == (not rows), "a new model copy exactly when something folds"
    assert folded.blocks == plan.blocks and folded.act_points == plan.act_points
    return plan.model, folded.model, rows


def assert_exact(before, after, feeds, label):
    for ref, out in zip(run_model(before, feeds), run_model(after, feeds)):
        scale = max(float(np.abs(ref).max()), 1.0)
        assert np.abs(ref - out).max() <= 1e-5 * scale, f"{label}: fold changed outputs by {np.abs(ref - out).max():.2e}"


# every LayerNorm but the ViT's last (read by a Gather); the LM's last feeds a bias-free head: no shift
@pytest.mark.parametrize("name, folds, shifted", [("digits_vit", 8, 8), ("tiny_lm", 9, 8)])
def test_fold_is_exact_on_bundled_transformers(name, folds, shifted):
    model = onnx.load(str(MODELS / f"{name}.onnx"))
    data = load_npz(MODELS / f"{name}.calib.npz", model)
    before, after, rows = folded_copy(model, data)
    assert len(rows) == folds, rows
    assert sum(r["shift"] for r in rows) == shifted, rows
    assert_exact(before, after, {k: v[:16] for k, v in data.arrays.items()}, name)


def test_fold_is_exact_for_the_op_form_with_several_readers():
    model = layernorm_model(np.linspace(0.5, 8.0, C))
    data = calibration(model)
    before, after, rows = folded_copy(model, data)
    assert [len(r["readers"]) for r in rows] == [2] and rows[0]["shift"], rows
    assert_exact(before, after, data.arrays, "LayerNormalization → 2 MatMul")


def test_fold_is_exact_for_the_decomposed_form_and_a_gemm_reader():
    model = decomposed_gemm_model()
    data = calibration(model)
    before, after, rows = folded_copy(model, data)
    assert len(rows) == 1 and rows[0]["shift"] and rows[0]["range_ratio"] > 5, rows
    assert_exact(before, after, data.arrays, "decomposed LayerNorm → Gemm(transB, alpha, beta)")


def test_after_the_fold_every_channel_spans_one_centred_range():
    model = layernorm_model(np.linspace(0.5, 8.0, C))
    data = calibration(model)
    _, after, _ = folded_copy(model, data)
    y = run_model(with_output(after, "y"), data.arrays)[-1].reshape(-1, C)
    lo, hi = y.min(0), y.max(0)
    assert np.allclose(hi - lo, (hi - lo).mean(), rtol=1e-4), hi - lo
    assert np.allclose(hi + lo, 0, atol=1e-4 * float(hi.max())), hi + lo


def with_output(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.add().name = tensor
    return out


def test_no_fold_where_a_reader_cannot_absorb_it_and_no_shift_without_a_bias():
    rng = np.random.default_rng(3)
    residual = with_inits(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {C}] x) => (float[N, {C}] z) {{
            y = LayerNormalization <axis = -1> (x, gamma, beta)
            m = MatMul (y, w)
            z = Add (m, y)
        }}""", gamma=rng.normal(1, 0.2, C), beta=rng.normal(0, 1, C), w=rng.normal(0, 0.3, (C, C)))
    plan = build_plan(residual, resolve(QuantConfig()).plan)
    assert find_layernorm_folds(plan.model, plan.act_points) == []
    no_bias = with_inits(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {C}] x) => (float[N, 8] z) {{
            y = LayerNormalization <axis = -1> (x, gamma)
            z = MatMul (y, w)
        }}""", gamma=rng.normal(1, 0.2, C), w=rng.normal(0, 0.3, (C, 8)))
    data = calibration(no_bias)
    before, after, rows = folded_copy(no_bias, data)
    assert len(rows) == 1 and not rows[0]["shift"], rows
    assert_exact(before, after, data.arrays, "LayerNormalization without β → MatMul without bias")


def test_fold_factors_equalise_ranges_with_unit_geometric_mean():
    lo, hi = np.array([-1.0, -10.0, 0.0, 2.0]), np.array([1.0, 30.0, 0.0, 3.0])
    r, m = fold_factors(lo, hi, shift=True)
    assert np.isclose(np.exp(np.log(r).mean()), 1.0) and np.all(r > 0)
    spans = (hi - lo) / r
    assert np.allclose(spans[[0, 1, 3]], spans[0]), spans  # the dead channel keeps a floor instead
    assert np.allclose(m, [0.0, 10.0, 0.0, 2.5])
    assert not fold_factors(lo, hi, shift=False)[1].any()


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_outlier_channels_quantize_far_better_with_the_fold(target):
    """Two LayerNorm channels 40× wider than the rest: one per-tensor step leaves the others a few
    levels; the fold gives each channel its own step while the emitted graph stays per-tensor."""
    gamma = np.where(np.arange(C) < 2, 40.0, 1.0)
    model = layernorm_model(gamma, seed=4, balanced=True)
    data = calibration(model, n=96)
    feeds = {"x": np.random.default_rng(5).normal(0.5, 2.0, (64, 4, C)).astype(np.float32)}
    fp = run_model(model, feeds)[0]
    scores = {}
    for fold in (False, True):
        config = QuantConfig(method="rtn", reparam_layernorm=fold, verify_samples=0, target=target)
        result = onnxflex.quantize(model, data.arrays, config, progress=False)
        scores[fold] = sqnr(fp, run_model(result.model, feeds)[0])
        if fold:
            assert len(result.report["layernorm_folds"]) == 1, result.report["layernorm_folds"]
            quantize_scales = {n.input[1] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
            sizes = [numpy_helper.to_array(t).size for t in result.model.graph.initializer if t.name in quantize_scales]
            assert sizes and set(sizes) == {1}, f"activation scales are not per tensor: sizes {sizes}"
    print(f"\nLayerNorm with outlier channels, {target} W8A8 RTN output SQNR: per-tensor {scores[False]:.1f} dB, "
          f"with the fold {scores[True]:.1f} dB", file=sys.stderr)
    assert scores[True] >= scores[False] + 10.0, scores
