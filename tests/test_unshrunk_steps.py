"""Unshrunk 4-bit steps (rounders.unshrunk_step): the symmetric MSE step at 4 bits or fewer moves to
where the rounded weight keeps the float weight's projection on itself, so that a deep stack of
4-bit layers does not shrink its output along the FP32 output; 8-bit steps stay the MSE search's."""
from __future__ import annotations

import torch

from onnxflex.rounding.rounders import RTNRounder, UNSHRUNK_ROUNDS, _grid_search, init_weight_scale, unshrunk_step


def projection_ratio(w: torch.Tensor, bits: int, search: str = "mse") -> torch.Tensor:
    """<Ŵ, W> / <W, W> per output channel (axis 0) of ``w`` rounded to nearest at ``bits``."""
    q = RTNRounder(w, 0, bits, search).fake_quant()
    return (q * w).sum(1) / (w * w).sum(1)


def test_a_4_bit_step_keeps_the_weights_projection():
    torch.manual_seed(0)
    w = torch.randn(64, 288) * torch.rand(64, 1)  # channels of different widths, Gaussian bulk
    ratio = projection_ratio(w, 4)
    absmax = w.abs().amax(1, keepdim=True)
    mse = _grid_search(w, absmax, (1,), -8, 7).reshape(-1)
    q = torch.clamp(torch.round(w / mse.reshape(-1, 1)), -8, 7) * mse.reshape(-1, 1)
    shrunk = (q * w).sum(1) / (w * w).sum(1)
    assert shrunk.mean() < 0.995, f"the MSE step alone shrinks by {1 - shrunk.mean():.4f} only: nothing to fix"
    off, was = float((ratio - 1).abs().mean()), float((shrunk - 1).abs().mean())
    assert off < 0.6 * was, f"projection ratio off 1 by {off:.4f} on average (MSE steps: {was:.4f})"


def test_a_stack_of_4_bit_layers_keeps_its_output_projection():
    torch.manual_seed(1)
    layers = [torch.randn(96, 96) / 96 ** 0.5 for _ in range(12)]
    x = torch.randn(256, 96)

    def run(weights):
        y = x
        for w in weights:
            y = y @ w.T
        return y

    fp = run(layers)
    along = lambda y: float((y * fp).sum() / (fp * fp).sum())  # the output's share along FP32's
    unshrunk = along(run([RTNRounder(w, 0, 4, "mse").fake_quant() for w in layers]))
    w_hat = []
    for w in layers:
        step = _grid_search(w, w.abs().amax(1, keepdim=True), (1,), -8, 7)
        w_hat.append(torch.clamp(torch.round(w / step), -8, 7) * step)
    shrunk = along(run(w_hat))
    assert abs(unshrunk - 1) < 0.5 * abs(shrunk - 1), \
        f"output projection on FP32's: unshrunk {unshrunk:.3f}, MSE steps {shrunk:.3f}"


def test_8_bit_and_minmax_steps_are_left_alone():
    torch.manual_seed(2)
    w = torch.randn(16, 72)
    absmax = w.abs().amax(1, keepdim=True)
    assert torch.equal(init_weight_scale(w, 0, 8, "mse"), _grid_search(w, absmax, (1,), -128, 127).reshape(-1))
    assert torch.equal(init_weight_scale(w, 0, 4, "minmax"), (absmax / 7).reshape(-1))


def test_an_all_zero_channel_keeps_its_step():
    w = torch.zeros(2, 8)
    w[1] = torch.linspace(-1, 1, 8)
    step = torch.full((2, 1), 0.25)
    got = unshrunk_step(w, step, (1,), -8, 7, UNSHRUNK_ROUNDS)
    assert got[0, 0] == 0.25 and torch.isfinite(got).all(), got
