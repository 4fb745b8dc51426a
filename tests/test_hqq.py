"""hqq (onnxflex/rounding/hqq.py): data-free half-quadratic weight steps, never above round-to-nearest's
lp error per channel or group, selectable with --method hqq and run end to end on the bundled LM."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from helpers import MODELS, run_model
from onnxflex.cli import main
from onnxflex.rounding.hqq import HQQRounder
from onnxflex.rounding.rounders import RTNRounder

LM = MODELS / "tiny_lm.onnx"
P = HQQRounder.P


def lm_matmul_weights() -> list[torch.Tensor]:
    """The bundled LM's MatMul weights [K, N] (output axis 1)."""
    model = onnx.load(str(LM))
    names = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    return [torch.from_numpy(numpy_helper.to_array(t).astype(np.float32)) for t in model.graph.initializer
            if t.name in names and len(t.dims) == 2]


def errors(rounder, w: torch.Tensor, power: float) -> torch.Tensor:
    """Σ |fake_quant − w|^power per step (scale-shaped), as the rounder's own step layout groups them."""
    residual = (rounder.fake_quant() - w).abs().pow(power)
    if rounder.group_size:
        k, n = w.shape
        return residual.reshape(k // rounder.group_size, rounder.group_size, n).sum(dim=1)
    return residual.sum(dim=0)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 0), (3, 16)])
def test_lp_error_not_above_rtn_in_any_step_and_lower_overall(bits, group):
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(3.0).sample((256, 64)) * 0.02  # outliers, where lp < 1 matters
    for w in [heavy] + lm_matmul_weights()[:4]:
        rtn = errors(RTNRounder(w, 1, bits, "mse", group), w, P)
        hqq = errors(HQQRounder(w, 1, bits, "mse", group), w, P)
        assert bool((hqq <= rtn).all()), f"W{bits} g{group}: a step's lp error rose above RTN's by " \
                                         f"{float((hqq - rtn).max()):.3g}"
        assert float(hqq.sum()) < float(rtn.sum()), f"W{bits} g{group}: lp error {float(hqq.sum()):.5g} not " \
                                                    f"below RTN's {float(rtn.sum()):.5g}"


def test_squared_weight_error_not_above_rtn_on_the_lm_weights():
    """Weight-only W4 g32, the setting hqq is for: the LM's MatMul weights lose less than with RTN."""
    ws = lm_matmul_weights()
    rtn = sum(float(errors(RTNRounder(w, 1, 4, "mse", 32), w, 2.0).sum()) for w in ws)
    hqq = sum(float(errors(HQQRounder(w, 1, 4, "mse", 32), w, 2.0).sum()) for w in ws)
    print(f"\nLM MatMul weights, W4 g32, squared error: RTN {rtn:.5g}, hqq {hqq:.5g} ({hqq / rtn:.4f})",
          file=sys.stderr)
    assert hqq <= rtn, f"hqq's squared weight error {hqq:.5g} above RTN's {rtn:.5g}"


def test_raise_steps_raises_the_refined_steps_it_rounds_with():
    """An int32 bias's floor (reconstruct.make_room_for_biases) applies to the steps hqq exports."""
    w = lm_matmul_weights()[0]
    r = HQQRounder(w, 1, 8, "mse")
    refined = r.step.clone()
    floor = refined * 1.5
    floor[0] = 0.0
    assert r.raise_steps(floor) == w.shape[1] - 1
    np.testing.assert_array_equal(r.export().scale, torch.maximum(refined, floor).numpy())


def test_quantize_method_hqq_weight_only_lm_runs_in_onnxruntime(tmp_path):
    out = tmp_path / "lm.hqq.onnx"
    args = ["quantize", str(LM), "--method", "hqq", "--wbits", "4", "--abits", "0", "--group-size", "32",
            "--calib", str(MODELS / "tiny_lm.calib.npz"), "--seed", "0", "-o", str(out), "--quiet"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with np.load(MODELS / "tiny_lm.eval.npz") as data:
        feeds = {i.name: data[i.name] for i in onnx.load(str(LM)).graph.input}
    fp, q = run_model(LM, feeds)[0], run_model(out, feeds)[0]
    sqnr = 10 * np.log10(np.sum(fp.astype(np.float64) ** 2) / np.sum((fp - q).astype(np.float64) ** 2))
    print(f"\nhqq W4 g32 LM logits in onnxruntime: SQNR vs FP32 {sqnr:.1f} dB", file=sys.stderr)
    assert sqnr >= 20.0, f"hqq W4 g32: onnxruntime logits SQNR vs FP32 {sqnr:.1f} dB < 20 dB"
    written = onnx.load(str(out))
    emitted = {t.name: t for t in written.graph.initializer}
    # weight-only W4 on onnxruntime is asymmetric by default: the 24 4-bit layers are MatMulNBits with zero
    # points; the head (8 bits by default, head_bits) a uint8 weight with uint8 zero points
    nbits = [n for n in written.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 24 and all(len(n.input) == 4 and n.input[3] for n in nbits), "24 4-bit layers with zps"
    assert sum(t.data_type == onnx.TensorProto.UINT8 and t.name.startswith("onnx::MatMul_645_")
               for t in emitted.values()) == 2, "the head's (/head/MatMul) uint8 weight and zero points"
