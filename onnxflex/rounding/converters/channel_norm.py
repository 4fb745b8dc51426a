"""Normalizations across neighbouring channels: LRN (local response normalization).

AlexNet-era CNNs (AlexNet, ZFNet, GoogLeNet) put LRN between their first convolutions; without a
converter their first blocks would run in onnxruntime with round-to-nearest weights.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from onnxflex.rounding.converters.registry import OpNode, converter, unsupported

Tensor = torch.Tensor


@converter("LRN", since=1)
def lrn(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """y = x / (bias + alpha / size · Σ x²)^beta, the sum over channels c − ⌊(size−1)/2⌋ … c + ⌈(size−1)/2⌉
    (clipped to [0, C)) of an N×C×D1×…×Dk input (k ≥ 0), as the ONNX text defines it.

    torch's ``local_response_norm`` puts the extra channel of an even ``size`` before c, not after, so
    the window is built here: x² padded on the channel axis and summed by an average pool of height
    ``size``, times ``size``.
    """
    x = inputs[0]
    size = int(node.attr("size"))
    if size < 1:
        raise unsupported(node, f"size={size}")
    alpha, beta, bias = (float(node.attr(a, d)) for a, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    before = (size - 1) // 2
    squares = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)  # N×1×C×(D1·…·Dk)
    padded = F.pad(squares, (0, 0, before, size - 1 - before))
    window = F.avg_pool2d(padded, (size, 1), stride=1) * size
    return (x / (bias + (alpha / size) * window.reshape(x.shape)).pow(beta),)
