"""Bias correction of low-bit layers: the int32 bias of a layer whose weights have CORRECTED_BITS bits or
fewer (every width below 8) follows its weight's rounding error, so that the layer's output keeps its FP mean on the
calibration data:

    b' = b − Σ_in (Ŵ − W) · μ        μ: the mean of the layer's input per input channel, FP calibration run

Conv: μ over the batch and spatial axes (channel axis 1), each output channel reading its group's
channels; MatMul and Gemm (A not transposed): over every axis but the last, summed along the weight's
input axis. Ŵ is first the rounding the block starts from (round-to-nearest, once the steps are final):
the corrected bias is fixed before the block learns (reconstruct.settle_biases), so that learning sees
the bias it is given. In a block whose outputs a head layer reads (reconstruct.head_feeders), once
it has learned, Ŵ is the learned rounding and the bias is corrected again
(QuantState.resettle_bias); that is what is checked against the start and emitted.

Why: at 4 bits a layer's rounding error has a mean per output channel that the next layers read as a
shifted input; through a deep network those shifts add up (a YOLOX detector at W4A8 lost 80 % of its
positive anchors with round-to-nearest, 67 % with the correction; on the bundled CNN 5-bit RTN was
below 4-bit RTN while only 4 bits were corrected). At 8 bits the mean is small, and those layers keep
their bias (and their emitted bytes) as they were. Layers inside a subgraph, layers
with no bias, ConvTranspose (an output pixel sees a stride-dependent share of the kernel) and Gemm
with ``transA`` are left alone.
"""
from __future__ import annotations

import torch

CORRECTED_BITS = 7
CHANNEL_AXIS = {"Conv": 1, "MatMul": -1, "Gemm": -1}  # the input's channel axis, per corrected op


def channel_axis(op_type: str, bits: int, trans_a: bool = False) -> int | None:
    """The axis of the layer input along which its mean is taken, or None when the layer keeps its bias."""
    if bits > CORRECTED_BITS or (op_type == "Gemm" and trans_a):
        return None
    return CHANNEL_AXIS.get(op_type)


class ChannelMeans:
    """Running means of tensors along one axis each, over batches (every other axis averaged)."""

    def __init__(self, axes: dict[str, int]) -> None:
        self.axes = axes
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        if name not in self.axes:
            return
        moved = value.detach().float().movedim(self.axes[name], -1)
        flat = moved.reshape(-1, moved.shape[-1])
        self.sums[name] = self.sums.get(name, 0) + flat.sum(0)
        self.counts[name] = self.counts.get(name, 0) + flat.shape[0]

    def mean(self, name: str) -> torch.Tensor | None:
        return self.sums[name] / self.counts[name] if self.counts.get(name) else None


def weight_shaped(mean: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor | None:
    """``mean`` [C_in] laid out to broadcast against ``weight`` (output channels on ``axis``): a Conv
    weight [M, C/g, k…] gets [M, C/g, 1…] (output channel m reads group m // (M/g)); a 2-D weight gets
    ``mean`` along its input axis 1 − ``axis``. None when the lengths do not match."""
    if weight.ndim > 2:
        per_group = weight.shape[1]
        groups = mean.numel() // per_group if per_group else 0
        if not groups or groups * per_group != mean.numel() or weight.shape[0] % groups:
            return None
        owner = torch.arange(weight.shape[0], device=mean.device) // (weight.shape[0] // groups)
        return mean.reshape(groups, per_group)[owner].reshape(*weight.shape[:2], *[1] * (weight.ndim - 2))
    inputs = 1 - axis
    if weight.ndim != 2 or weight.shape[inputs] != mean.numel():
        return None
    return mean.reshape([-1 if d == inputs else 1 for d in range(2)])


def bias_shift(quantized: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, axis: int) -> torch.Tensor:
    """Σ_in (Ŵ − W) · μ per output channel (``axis``): what the rounding adds to the layer's output mean.
    ``mean`` is ``weight_shaped``'s."""
    dims = tuple(d for d in range(weight.ndim) if d != axis)
    return ((quantized - weight) * mean).sum(dim=dims)
