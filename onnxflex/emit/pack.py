"""Low-bit weight layouts the emitter writes: packed INT4/UINT4 initializers and blocked scales.

ONNX stores 4-bit tensors two values to a byte, in row-major order, the first of each pair in the
low nibble and the second in the high nibble; an odd count leaves the last high nibble as padding
(zero here). Signed values are 4-bit two's complement. This is the layout of
``onnx.numpy_helper.from_array`` for ml_dtypes int4/uint4 arrays, and tests check the two agree.
"""
from __future__ import annotations

import numpy as np
import onnx

INT4_RANGE = {True: (-8, 7), False: (0, 15)}


def pack_int4(values: np.ndarray, signed: bool) -> np.ndarray:
    """uint8 [ceil(n / 2)] holding the n = values.size integers of ``values`` (any shape, flattened
    row-major), each in [-8, 7] when ``signed`` else [0, 15]. Raises ValueError outside that range or
    for non-integral values."""
    flat = np.asarray(values).reshape(-1)
    if flat.dtype.kind in "iu":
        ints = flat  # the emitter's int8 / uint8 integers: no wider copy of a large layer
    else:
        ints = flat.astype(np.int64)
        if flat.dtype.kind == "f" and not np.array_equal(ints, flat):
            raise ValueError("pack_int4 takes integers; round the values first")
    lo, hi = INT4_RANGE[signed]
    if ints.size and (ints.min() < lo or ints.max() > hi):
        raise ValueError(f"{'signed' if signed else 'unsigned'} 4-bit values must lie in [{lo}, {hi}], "
                         f"got [{ints.min()}, {ints.max()}]")
    nibbles = (ints & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, count: int, signed: bool) -> np.ndarray:
    """The first ``count`` 4-bit values of ``packed`` (uint8 [ceil(count / 2)]) as a flat int8 array
    (``signed``, in [-8, 7]) or uint8 array (in [0, 15])."""
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if data.size != (count + 1) // 2:
        raise ValueError(f"{count} 4-bit values take {(count + 1) // 2} bytes, got {data.size}")
    nibbles = np.empty(2 * data.size, np.uint8)
    nibbles[0::2], nibbles[1::2] = data & 0x0F, data >> 4
    nibbles = nibbles[:count]
    if not signed:
        return nibbles
    return ((nibbles ^ 0x08).astype(np.int8) - np.int8(8)).astype(np.int8)


def int4_initializer(values: np.ndarray, name: str, signed: bool) -> onnx.TensorProto:
    """An INT4 (``signed``) or UINT4 initializer with ``values``' shape, packed into raw_data."""
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    tensor.dims.extend(np.shape(values))
    tensor.raw_data = pack_int4(values, signed).tobytes()
    return tensor


def blocked_scale_shape(shape: tuple[int, ...], axis: int, block_size: int) -> tuple[int, ...]:
    """Shape of the scale (and zero point) of a DequantizeLinear with ``block_size`` along ``axis``
    (opset 21 blocked quantization): ``shape`` with dimension ``axis`` divided by ``block_size``,
    rounded up (the last block may be short)."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    axis = axis % len(shape)
    return tuple(-(-d // block_size) if k == axis else d for k, d in enumerate(shape))
