"""Neural-network layer converters: convolutions, matrix products, pools, normalizations, Resize, Pad.

Spatial ops take N×C×D1×…×Dn inputs with n = 1, 2 or 3. Pads that torch cannot express (asymmetric,
or wider than half a window) are applied with ``F.pad`` first, so every ONNX padding works.
Where onnxruntime departs from the ONNX text (pool ceil_mode and SAME pads, ConvTranspose
output_shape, Resize axes of scale 1), these converters follow onnxruntime and say so.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from onnxflex.rounding.converters.registry import (OpNode, const_ints, converter, numpy_value, optional_input,
                                                    unsupported)

Tensor = torch.Tensor

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}





def _spatial_rank(node: OpNode, x: Tensor) -> int:
    if x.dim() - 2 not in _CONV:
        raise unsupported(node, f"input of rank {x.dim()} (only 1-D, 2-D and 3-D spatial)")
    return x.dim() - 2


# --- window geometry -----------------------------------------------------------------------------


def _flat_pads(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """Per-axis (begin, end) pads in F.pad's order: last axis first."""
    return [p for b, e in reversed(list(zip(begins, ends))) for p in (b, e)]


def _split_pad(total: int, upper: bool) -> tuple[int, int]:
    """(begin, end) halves of a total pad: the odd one at the end if ``upper`` (SAME_UPPER), else the start."""
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


def _same_pads(node: OpNode, size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(begin, end) pads making a Conv or pool output ceil(size / stride) long."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return _split_pad(total, node.attr("auto_pad") == "SAME_UPPER")


def _window(node: OpNode, x: Tensor, kernel: Sequence[int],
            same_dilated: bool = True) -> tuple[list[int], list[int], list[int], list[int]]:
    """strides, dilations, pad begins and pad ends of a Conv or pool window, auto_pad resolved.

    ``same_dilated=False`` sizes SAME pads from the undilated kernel, as onnxruntime does for pools.
    """
    n = len(kernel)
    strides = const_ints(node.attr("strides")) or [1] * n
    dilations = const_ints(node.attr("dilations")) or [1] * n
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        same_dilations = dilations if same_dilated else [1] * n
        pairs = [_same_pads(node, *args) for args in zip(x.shape[2:], kernel, strides, same_dilations)]
        return strides, dilations, [b for b, _ in pairs], [e for _, e in pairs]
    if auto_pad == "VALID":
        return strides, dilations, [0] * n, [0] * n
    if auto_pad != "NOTSET":
        raise unsupported(node, f"auto_pad={auto_pad!r}")
    pads = const_ints(node.attr("pads")) or [0] * (2 * n)
    return strides, dilations, pads[:n], pads[n:]


def _torch_pads(kernel: Sequence[int], begins: Sequence[int], ends: Sequence[int]) -> bool:
    """Whether torch's own pool padding (symmetric, at most half the kernel) can express the pads."""
    return begins == ends and all(2 * p <= k for p, k in zip(begins, kernel))


def _pool_lens(x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
               begins: Sequence[int], ends: Sequence[int], ceil_mode: bool) -> list[int]:
    """Output lengths of a pool; with ceil_mode a last window must start before the end pad."""
    lens = []
    for size, k, s, d, b, e in zip(x.shape[2:], kernel, strides, dilations, begins, ends):
        span = size + b + e - (k - 1) * d - 1
        out = (-(-span // s) if ceil_mode else span // s) + 1
        lens.append(out - 1 if ceil_mode and (out - 1) * s >= size + b else out)
    return lens


def _padded_pool(pool: Callable[..., Tensor], x: Tensor, flat_pads: list[int], lens: Sequence[int],
                 value: float, *args) -> Tensor:
    """``pool`` (called with padding 0) over x padded with ``value``, cut to the ONNX output ``lens``.

    torch sees the pads as data, so in ceil mode it may keep a last window starting in the end pad.
    """
    y = pool(F.pad(x, flat_pads, value=value), *args)
    return y[(..., *(slice(0, n) for n in lens))]


# --- convolutions and matrix products ------------------------------------------------------------


@converter("Conv", since=1)
def conv(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """N-D convolution of X (N×C×…) by W (M×C/group×k…) plus optional B (M); all pad forms."""
    x, w, b = inputs[0], inputs[1], optional_input(inputs, 2)
    n = _spatial_rank(node, x)
    strides, dilations, begins, ends = _window(node, x, w.shape[2:])
    padding: list[int] | int = begins
    if begins != ends:
        x, padding = F.pad(x, _flat_pads(begins, ends)), 0
    return (_CONV[n](x, w, b, strides, padding, dilations, int(node.attr("group", 1))),)


def _transpose_pads(node: OpNode, x: Tensor, kernel: Sequence[int], strides: Sequence[int],
                    dilations: Sequence[int], output_padding: Sequence[int]) -> tuple[list[int], list[int]]:
    """Pad begins and ends cropping the full transposed output, from pads, output_shape or auto_pad SAME.

    A negative end (output_shape past the full output) grows the output there, as onnxruntime does.
    """
    n, auto_pad = len(kernel), node.attr("auto_pad", "NOTSET")
    output_shape = const_ints(node.attr("output_shape"))
    if output_shape is None and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        if auto_pad == "VALID":
            return [0] * n, [0] * n
        pads = const_ints(node.attr("pads")) or [0] * (2 * n)
        return pads[:n], pads[n:]
    full = [s * (size - 1) + op + (k - 1) * d + 1
            for size, s, op, k, d in zip(x.shape[2:], strides, output_padding, kernel, dilations)]
    if output_shape is None:  # SAME aims at size * stride but, in onnxruntime, never grows
        totals = [max(f - size * s, 0) for f, size, s in zip(full, x.shape[2:], strides)]
    else:
        totals = [f - o for f, o in zip(full, output_shape[-n:])]
    pairs = [(0, t) if t < 0 else _split_pad(t, auto_pad == "SAME_UPPER") for t in totals]
    return [b for b, _ in pairs], [e for _, e in pairs]


@converter("ConvTranspose", since=1)
def conv_transpose(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """N-D transposed convolution; W is C×M/group×k…; pads crop the full output, output_shape honoured."""
    x, w, b = inputs[0], inputs[1], optional_input(inputs, 2)
    n = _spatial_rank(node, x)
    kernel = list(w.shape[2:])
    strides = const_ints(node.attr("strides")) or [1] * n
    dilations = const_ints(node.attr("dilations")) or [1] * n
    output_padding = const_ints(node.attr("output_padding")) or [0] * n
    begins, ends = _transpose_pads(node, x, kernel, strides, dilations, output_padding)
    y = _CONV_TRANSPOSE[n](x, w, None, strides, 0, output_padding, int(node.attr("group", 1)), dilations)
    # Negative F.pad crops; a positive one (output_shape beyond the full output) grows with zeros.
    y = F.pad(y, _flat_pads([-p for p in begins], [-p for p in ends]))
    return (y if b is None else y + b.reshape([1, -1] + [1] * n),)


@converter("Gemm", since=1)
def gemm(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """alpha * A' @ B' + beta * C with A', B' optionally transposed (2-D) and C broadcast and optional."""
    a, b, c = inputs[0], inputs[1], optional_input(inputs, 2)
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    a = a.t() if node.attr("transA", 0) else a
    b = b.t() if node.attr("transB", 0) else b
    y = a @ b if alpha == 1.0 else alpha * (a @ b)
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return (y,)


@converter("MatMul", since=1)
def matmul(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """numpy.matmul: 1-D operands promoted and squeezed, batch dims broadcast."""
    return (torch.matmul(inputs[0], inputs[1]),)


# --- pools ---------------------------------------------------------------------------------------


@converter("MaxPool", since=1)
def max_pool(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Max pool with kernel_shape, strides, pads/auto_pad, dilations, ceil_mode; output Indices unsupported."""
    if len(node.outputs) > 1 and node.outputs[1]:
        raise unsupported(node, "output 1 (Indices)")
    x = inputs[0]
    n = _spatial_rank(node, x)
    kernel = const_ints(node.attr("kernel_shape"))
    strides, dilations, begins, ends = _window(node, x, kernel, same_dilated=False)
    ceil_mode = bool(node.attr("ceil_mode", 0))
    if _torch_pads(kernel, begins, ends):
        return (_MAX_POOL[n](x, kernel, strides, begins, dilations, ceil_mode),)
    lens = _pool_lens(x, kernel, strides, dilations, begins, ends, ceil_mode)
    return (_padded_pool(_MAX_POOL[n], x, _flat_pads(begins, ends), lens, float("-inf"),
                         kernel, strides, 0, dilations, ceil_mode),)


@converter("AveragePool", since=1)
def average_pool(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Average pool with kernel_shape, strides, pads/auto_pad, ceil_mode, count_include_pad (default 0).

    Dilations other than 1 (opset 19) are unsupported.
    """
    x = inputs[0]
    n = _spatial_rank(node, x)
    kernel = const_ints(node.attr("kernel_shape"))
    strides, dilations, begins, ends = _window(node, x, kernel, same_dilated=False)
    if any(d != 1 for d in dilations):
        raise unsupported(node, f"dilations={dilations}")
    ceil_mode, include_pad = bool(node.attr("ceil_mode", 0)), bool(node.attr("count_include_pad", 0))
    pool = _AVG_POOL[n]
    if _torch_pads(kernel, begins, ends):
        return (pool(x, kernel, strides, begins, ceil_mode, include_pad),)
    flat, lens = _flat_pads(begins, ends), _pool_lens(x, kernel, strides, dilations, begins, ends, ceil_mode)
    y = _padded_pool(pool, x, flat, lens, 0.0, kernel, strides, 0, ceil_mode)
    if include_pad:
        return (y,)
    # Both pools divide by the same window size, so the ratio is sum(x) / count(real elements).
    count = _padded_pool(pool, torch.ones_like(x[:1, :1]), flat, lens, 0.0, kernel, strides, 0, ceil_mode)
    return (y / count,)


@converter("GlobalAveragePool", since=1)
def global_average_pool(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Mean over all spatial axes, kept as size 1."""
    x = inputs[0]
    return (x.mean(dim=tuple(range(2, x.dim())), keepdim=True),)


@converter("GlobalMaxPool", since=1)
def global_max_pool(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Max over all spatial axes, kept as size 1."""
    x = inputs[0]
    return (x.amax(dim=tuple(range(2, x.dim())), keepdim=True),)


# --- softmax -------------------------------------------------------------------------------------


def _coerced_2d(x: Tensor, axis: int, fn: Callable[..., Tensor]) -> Tensor:
    """``fn`` over x viewed as 2-D (prod(shape[:axis]), prod(shape[axis:])), as opsets < 13 define it."""
    axis = axis + x.dim() if axis < 0 else axis
    flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return fn(flat, dim=1).reshape(x.shape)


@converter("Softmax", since=1)
def softmax_2d(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Softmax over all axes from ``axis`` (default 1) together (opsets 1–12)."""
    return (_coerced_2d(inputs[0], int(node.attr("axis", 1)), F.softmax),)


@converter("Softmax", since=13)
def softmax(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Softmax along ``axis`` (default -1)."""
    return (F.softmax(inputs[0], dim=int(node.attr("axis", -1))),)


@converter("LogSoftmax", since=1)
def log_softmax_2d(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """LogSoftmax over all axes from ``axis`` (default 1) together (opsets 1–12)."""
    return (_coerced_2d(inputs[0], int(node.attr("axis", 1)), F.log_softmax),)


@converter("LogSoftmax", since=13)
def log_softmax(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """LogSoftmax along ``axis`` (default -1)."""
    return (F.log_softmax(inputs[0], dim=int(node.attr("axis", -1))),)


# --- normalizations ------------------------------------------------------------------------------


@converter("BatchNormalization", since=1)
def batch_normalization(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Inference form: scale * (X - mean) / sqrt(var + epsilon) + B per channel (axis 1); output Y only."""
    if node.attr("training_mode", 0) or any(node.outputs[1:]):
        raise unsupported(node, "training mode (outputs beyond Y)")
    if not node.attr("spatial", 1):
        raise unsupported(node, "spatial=0")
    x, scale, bias, mean, var = inputs[:5]
    eps = float(node.attr("epsilon", 1e-5))
    return (F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps),)


@converter("LayerNormalization", since=17)
def layer_normalization(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Normalize over axes [axis, rank) (axis default -1), then * Scale + B (broadcast).

    Returns Y, Mean and InvStdDev (keepdims) as far as the node lists outputs.
    """
    x, scale, bias = inputs[0], inputs[1], optional_input(inputs, 2)
    axis = int(node.attr("axis", -1)) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    inv_std = torch.rsqrt(centered.square().mean(dim=dims, keepdim=True) + float(node.attr("epsilon", 1e-5)))
    y = centered * inv_std * scale
    y = y if bias is None else y + bias
    return (y, mean, inv_std)[: max(len(node.outputs), 1)]


# --- Resize --------------------------------------------------------------------------------------

_NEAREST = {
    "round_prefer_floor": lambda c: np.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: np.floor(c + 0.5),
    "floor": np.floor,
    "ceil": np.ceil,
}


# coordinate_transformation_mode → input coordinate of each output index x, in float32 like onnxruntime.
# half_pixel_symmetric (opset 19) is left out: onnxruntime's float rounding of it could not be matched.
_COORDINATES: dict[str, Callable[[np.ndarray, np.float32, int, int], np.ndarray]] = {
    "asymmetric": lambda x, scale, in_len, out_len: x / scale,
    "half_pixel": lambda x, scale, in_len, out_len: (x + 0.5) / scale - 0.5,
    "pytorch_half_pixel": lambda x, scale, in_len, out_len: (x + 0.5) / scale - 0.5 if out_len > 1 else 0 * x,
    "align_corners": lambda x, scale, in_len, out_len: (
        x * np.float32(in_len - 1) / np.float32(out_len - 1) if out_len > 1 else 0 * x),
    "tf_half_pixel_for_nn": lambda x, scale, in_len, out_len: (x + 0.5) / scale,
}


def _resize_axis(x: Tensor, axis: int, coords: np.ndarray, mode: str, nearest_mode: str) -> Tensor:
    """Sample x along ``axis`` at ``coords``: nearest index, or linear between the two neighbours."""
    in_len = x.shape[axis]
    if mode == "nearest":
        index = np.clip(_NEAREST[nearest_mode](coords), 0, in_len - 1).astype(np.int64)
        return x.index_select(axis, torch.as_tensor(index, device=x.device))
    coords = np.clip(coords, 0, in_len - 1)
    low = np.floor(coords).astype(np.int64)
    high = np.minimum(low + 1, in_len - 1)
    w = torch.as_tensor(coords - low, dtype=x.dtype, device=x.device)
    w = w.reshape([-1 if d == axis else 1 for d in range(x.dim())])
    below, above = (x.index_select(axis, torch.as_tensor(i, device=x.device)) for i in (low, high))
    return below * (1 - w) + above * w


def _resize_check(node: OpNode) -> tuple[str, str, str]:
    """(mode, coordinate_transformation_mode, nearest_mode), or NotImplementedError naming what is not."""
    mode = node.attr("mode", "nearest")
    coord_mode = node.attr("coordinate_transformation_mode", "half_pixel")
    nearest_mode = node.attr("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear"):
        raise unsupported(node, f"mode={mode!r} (only nearest and linear)")
    if coord_mode not in _COORDINATES:
        raise unsupported(node, f"coordinate_transformation_mode={coord_mode!r}")
    if mode == "nearest" and nearest_mode not in _NEAREST:
        raise unsupported(node, f"nearest_mode={nearest_mode!r}")
    if node.attr("antialias", 0):
        raise unsupported(node, "antialias=1")
    if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise unsupported(node, f"keep_aspect_ratio_policy={node.attr('keep_aspect_ratio_policy')!r}")
    return mode, coord_mode, nearest_mode


@converter("Resize", since=11)
def resize(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Resize X by ``scales`` (out = floor(in * scale)) or to ``sizes``, over ``axes`` (opset 18) or all.

    Modes nearest and linear (per axis, so bilinear on NCHW) with the coordinate modes of
    ``_COORDINATES``; cubic, tf_crop_and_resize, antialias and keep_aspect_ratio_policy are unsupported.
    """
    mode, coord_mode, nearest_mode = _resize_check(node)
    x, scales, sizes = inputs[0], optional_input(inputs, 2), optional_input(inputs, 3)
    axes = [a % x.dim() for a in node.attr("axes") or range(x.dim())]
    in_lens = [x.shape[a] for a in axes]
    if sizes is not None and sizes.numel():
        out_lens = const_ints(sizes)
        factors = [np.float32(o) / np.float32(i) for o, i in zip(out_lens, in_lens)]
    else:
        factors = [np.float32(s) for s in numpy_value(scales).reshape(-1)]
        out_lens = [int(np.floor(np.float32(i) * f)) for i, f in zip(in_lens, factors)]
    for axis, in_len, out_len, factor in zip(axes, in_lens, out_lens, factors):
        if out_len == in_len and factor == 1:  # onnxruntime copies such axes whatever the coordinate mode
            continue
        coords = _COORDINATES[coord_mode](np.arange(out_len, dtype=np.float32), factor, in_len, out_len)
        x = _resize_axis(x, axis, coords, mode, nearest_mode)
    return (x,)


# --- Pad -----------------------------------------------------------------------------------------


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded >= size, period - folded, folded)


# mode → source index along an axis of ``size`` for each (possibly out-of-range) output position.
_PAD_INDEX: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "reflect": _reflect,
    "edge": lambda index, size: np.clip(index, 0, size - 1),
    "wrap": lambda index, size: np.mod(index, size),
}


def _pad(node: OpNode, x: Tensor, pads: list[int], value: float | int, axes: list[int] | None) -> Tensor:
    """Pad x by ``pads`` = [begins…, ends…] over ``axes`` (all when None); negative pads crop."""
    mode = node.attr("mode", "constant")
    axes = [a % x.dim() for a in axes] if axes else list(range(x.dim()))
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for axis, begin, end in zip(axes, pads[: len(axes)], pads[len(axes):]):
        begins[axis], ends[axis] = begin, end
    if mode == "constant":
        return F.pad(x, _flat_pads(begins, ends), value=value)
    if mode not in _PAD_INDEX:
        raise unsupported(node, f"mode={mode!r}")
    for axis, (begin, end) in enumerate(zip(begins, ends)):
        if begin or end:
            index = _PAD_INDEX[mode](np.arange(-begin, x.shape[axis] + end), x.shape[axis])
            x = x.index_select(axis, torch.as_tensor(index, dtype=torch.long, device=x.device))
    return x


@converter("Pad", since=2)
def pad_attrs(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Pad with attributes pads, mode and value (opsets 2–10)."""
    return (_pad(node, inputs[0], const_ints(node.attr("pads")), float(node.attr("value", 0.0)), None),)


@converter("Pad", since=11)
def pad(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Pad with inputs pads, optional constant_value and (opset 18) axes; modes constant, reflect, edge, wrap."""
    value = optional_input(inputs, 2)
    value = 0 if value is None else numpy_value(value).reshape(-1)[0].item()
    return (_pad(node, inputs[0], const_ints(inputs[1]), value, const_ints(optional_input(inputs, 3))),)
