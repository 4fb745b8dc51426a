"""Exported quantization parameters: plain numpy records shared by the torch side and the emitter."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def channel_shape(rank: int, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along ``axis`` of a rank-``rank`` tensor."""
    return tuple(-1 if d == axis else 1 for d in range(rank))


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight as the emitter writes it: ``w ≈ (ints - zero_point) * scale``, DequantizeLinear's
    ``axis`` and ``block_size`` semantics.

    ints: int8 array with the weight's shape (values within ``bits``, signed), zero_point int8 zeros
        (symmetric); or, on an asymmetric grid, ints and zero_point uint8 (values in [0, 2^bits − 1]).
    block_size 0: per channel, ``axis`` the output-channel axis, scale float32 [channels] and
        zero_point [channels].
    block_size G > 0: blocked (opset 21), ``axis`` the blocked (input-channel) axis, one step per G
        consecutive elements along it: scale float32 and zero_point of shape
        ``emit.pack.blocked_scale_shape(ints.shape, axis, G)``; the emitter writes the integers (and an
        asymmetric weight's zero points) as INT4 / UINT4.
    """

    ints: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    bits: int
    block_size: int = 0

    @property
    def asymmetric(self) -> bool:
        """Unsigned integers with zero points (else signed, zero point 0)."""
        return self.ints.dtype == np.uint8

    def spread(self, values: np.ndarray) -> np.ndarray:
        """A scale-shaped array (scale or zero point) made broadcastable against ``ints``."""
        if not self.block_size:
            return values.reshape(channel_shape(self.ints.ndim, self.axis))
        full = np.repeat(values, self.block_size, axis=self.axis)
        return full.take(np.arange(self.ints.shape[self.axis]), axis=self.axis)  # a short last block

    def dequantize(self) -> np.ndarray:
        zp = self.spread(self.zero_point.astype(np.float32))
        return ((self.ints.astype(np.float32) - zp) * self.spread(self.scale)).astype(np.float32)


@dataclass(frozen=True)
class QuantizedBias:
    """An int32 bias with per-channel step ``scale`` = input step × weight step (zero point 0)."""

    ints: np.ndarray
    scale: np.ndarray


@dataclass(frozen=True)
class ActParams:
    scale: float
    zero_point: int
    dtype: int  # onnx.TensorProto.UINT8 or INT8


@dataclass(frozen=True)
class QuantParams:
    """Everything the emitter needs, keyed by ONNX names (weight initializer, bias initializer, tensor)."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    biases: dict[str, QuantizedBias] = field(default_factory=dict)
    acts: dict[str, ActParams] = field(default_factory=dict)


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB (inf when equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(float(np.sum(ref ** 2)), 1e-30) / noise))
