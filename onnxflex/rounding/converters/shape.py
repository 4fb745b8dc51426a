"""Shape, indexing and constant-producing converters.

Shape-like inputs (shape, axes, starts, repeats…) are read as constants with ``numpy_value``;
data inputs stay torch tensors so gradients reach them through views and index_select.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from onnxflex.rounding.converters.registry import (OpNode, const_ints, converter, numpy_value, optional_input,
                                                    unsupported)

Tensor = torch.Tensor
_INT64_MAX = np.iinfo(np.int64).max





# --- reshaping -----------------------------------------------------------------------------------


@converter("Flatten", since=1)
def flatten(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """2-D view (prod(shape[:axis]), prod(shape[axis:])); axis default 1, negative from opset 11."""
    x = inputs[0]
    axis = int(node.attr("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    return (x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:])),)


@converter("Reshape", since=5)
def reshape(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Reshape to the ``shape`` input: -1 is inferred; 0 copies the input dim unless allowzero=1."""
    x, shape = inputs[0], const_ints(inputs[1])
    if not node.attr("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return (x.reshape(shape),)


@converter("Transpose", since=1)
def transpose(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Permute axes by ``perm``; the default reverses them."""
    x = inputs[0]
    perm = node.attr("perm") or list(reversed(range(x.dim())))
    return (x.permute(*[int(p) for p in perm]),)


def _squeeze(x: Tensor, axes: list[int] | None) -> Tensor:
    """Drop the listed size-1 axes, or every size-1 axis when ``axes`` is empty or None."""
    if not axes:
        return x.reshape([d for d in x.shape if d != 1])
    drop = {a % x.dim() for a in axes}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])


def _unsqueeze(x: Tensor, axes: list[int]) -> Tensor:
    """Insert size-1 axes at ``axes``, which index the output (negative counts from its end)."""
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@converter("Squeeze", since=1)
def squeeze_attr(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Squeeze with axes as attribute (opsets 1–12)."""
    return (_squeeze(inputs[0], const_ints(node.attr("axes"))),)


@converter("Squeeze", since=13)
def squeeze(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Squeeze with axes as optional input (opset 13+)."""
    return (_squeeze(inputs[0], const_ints(optional_input(inputs, 1))),)


@converter("Unsqueeze", since=1)
def unsqueeze_attr(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Unsqueeze with axes as attribute (opsets 1–12)."""
    return (_unsqueeze(inputs[0], const_ints(node.attr("axes"))),)


@converter("Unsqueeze", since=13)
def unsqueeze(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Unsqueeze with axes as input (opset 13+)."""
    return (_unsqueeze(inputs[0], const_ints(inputs[1])),)


@converter("Expand", since=8)
def expand(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Broadcast x against ``shape`` in both directions (the result may be larger than ``shape``)."""
    x = inputs[0]
    out = np.broadcast_shapes(tuple(x.shape), tuple(const_ints(inputs[1])))
    return (x.expand(out),)


@converter("Tile", since=6)
def tile(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Repeat x ``repeats[i]`` times along axis i."""
    return (inputs[0].repeat(const_ints(inputs[1])),)


@converter("DepthToSpace", since=1)
def depth_to_space(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """[N, C, H, W] → [N, C/b², H·b, W·b] for ``blocksize`` b, channels read as (b, b, C/b²) in mode DCR
    (the default, and opset 1's only mode) or (C/b², b, b) in mode CRD (torch's pixel_shuffle)."""
    x, b = inputs[0], int(node.attr("blocksize"))
    n, c, h, w = x.shape
    if node.attr("mode", "DCR") == "CRD":
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return (y.reshape(n, c // (b * b), h * b, w * b),)


@converter("SpaceToDepth", since=1)
def space_to_depth(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """[N, C, H, W] → [N, C·b², H/b, W/b] for ``blocksize`` b, the (row, column) offset in the block
    outermost in the new channels (the inverse of DepthToSpace in mode DCR)."""
    x, b = inputs[0], int(node.attr("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return (y.reshape(n, c * b * b, h // b, w // b),)


# --- joining and splitting -----------------------------------------------------------------------


@converter("Concat", since=4)
def concat(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Concatenate along ``axis`` (required; negative from opset 11)."""
    return (torch.cat(list(inputs), dim=int(node.attr("axis"))),)


def _split(x: Tensor, axis: int, sizes: list[int] | None, n_outputs: int) -> tuple[Tensor, ...]:
    """Pieces of ``sizes`` along ``axis``, or ``n_outputs`` pieces of ceil(dim / n), the last smaller."""
    if sizes:
        return tuple(torch.split(x, sizes, dim=axis))
    return tuple(torch.split(x, math.ceil(x.shape[axis] / n_outputs), dim=axis))


@converter("Split", since=2)
def split_attr(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Split with sizes as attribute ``split`` (opsets 2–12); one tensor per node output."""
    return _split(inputs[0], int(node.attr("axis", 0)), const_ints(node.attr("split")), len(node.outputs))


@converter("Split", since=13)
def split(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Split with sizes as optional input ``split``, or num_outputs (opset 18) pieces."""
    n_outputs = int(node.attr("num_outputs", len(node.outputs)))
    return _split(inputs[0], int(node.attr("axis", 0)), const_ints(optional_input(inputs, 1)), n_outputs)


# --- indexing ------------------------------------------------------------------------------------


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    """x[start:end:step] along ``axis`` with ONNX clamping; negative steps go through index_select."""
    dim = x.shape[axis]
    if step < 0 and end == _INT64_MAX:  # onnxruntime reads it as "through the first element", not as dim - 1
        end = -dim - 1
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        index = [slice(None)] * x.dim()
        index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        return x[tuple(index)]
    # torch slicing rejects negative steps; clamp as ONNX does for them and gather explicitly.
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    index = torch.tensor(range(start, end, step), dtype=torch.long, device=x.device)  # empty when end >= start
    return x.index_select(axis, index)


def _slice(node: OpNode, x: Tensor, starts: list[int], ends: list[int],
           axes: list[int] | None, steps: list[int] | None) -> tuple[Tensor, ...]:
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    if 0 in steps:
        raise unsupported(node, "step 0")
    for axis, start, end, step in zip(axes, starts, ends, steps):
        x = _slice_axis(x, axis % x.dim(), start, end, step)
    return (x,)


@converter("Slice", since=1)
def slice_attrs(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Slice with starts, ends, axes as attributes (opsets 1–9); steps are 1."""
    return _slice(node, inputs[0], const_ints(node.attr("starts")), const_ints(node.attr("ends")),
                  const_ints(node.attr("axes")), None)


@converter("Slice", since=10)
def slice_(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Slice with inputs starts, ends, optional axes and steps; negative steps and INT64 bounds work."""
    return _slice(node, inputs[0], const_ints(inputs[1]), const_ints(inputs[2]),
                  const_ints(optional_input(inputs, 3)), const_ints(optional_input(inputs, 4)))


@converter("Gather", since=1)
def gather(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Take ``indices`` (any rank, negative counts from the end) along ``axis``, default 0.

    Output shape: x.shape[:axis] + indices.shape + x.shape[axis + 1:].
    """
    x, indices = inputs[0], inputs[1].to(device=inputs[0].device, dtype=torch.long)
    axis = int(node.attr("axis", 0)) % x.dim()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = x.index_select(axis, indices.reshape(-1))
    return (picked.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1:]),)


@converter("GatherND", since=11)
def gather_nd(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Index ``data`` with the last axis of ``indices`` (k coordinates each, negative counts from the
    end) after ``batch_dims`` leading axes both share (opset 12; 0 before).

    Output shape: indices.shape[:-1] + data.shape[batch_dims + k:].
    """
    data, indices = inputs[0], inputs[1].to(device=inputs[0].device, dtype=torch.long)
    b = int(node.attr("batch_dims", 0))
    k = indices.shape[-1]
    batch = data.shape[:b]
    flat = data.reshape((-1,) + tuple(data.shape[b:]))
    coords = indices.reshape(flat.shape[0], -1, k)
    sizes = torch.tensor(data.shape[b:b + k], device=data.device, dtype=torch.long)
    coords = torch.where(coords < 0, coords + sizes, coords)
    rows = torch.arange(flat.shape[0], device=data.device).unsqueeze(1).expand(coords.shape[:2])
    picked = flat[(rows,) + tuple(coords[..., j] for j in range(k))]
    return (picked.reshape(tuple(batch) + tuple(indices.shape[b:-1]) + tuple(data.shape[b + k:])),)


@converter("GatherElements", since=11)
def gather_elements(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """out[i][j][k] = data[index[i][j][k]][j][k] along ``axis`` (default 0); negative indices count from
    the end. Output shape: the indices' shape."""
    data, indices = inputs[0], inputs[1].to(device=inputs[0].device, dtype=torch.long)
    axis = int(node.attr("axis", 0)) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return (torch.gather(data, axis, indices),)


@converter("CumSum", since=11)
def cumsum(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Running sum along the constant ``axis`` input, in the input's dtype; ``exclusive=1`` leaves each
    element out of its own sum (the first is 0), ``reverse=1`` sums from the end. Exporters write it
    for position ids computed from an attention mask."""
    x, axis = inputs[0], const_ints(inputs[1])[0] % max(inputs[0].dim(), 1)
    reverse = bool(node.attr("reverse", 0))
    y = torch.cumsum(x.flip(axis) if reverse else x, axis, dtype=x.dtype)
    if node.attr("exclusive", 0):
        first = torch.zeros_like(y.narrow(axis, 0, 1))
        y = torch.cat([first, y.narrow(axis, 0, y.shape[axis] - 1)], axis)
    return (y.flip(axis) if reverse else y,)


# --- shape queries -------------------------------------------------------------------------------


@converter("Shape", since=1)
def shape(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """x's shape as 1-D int64 on x's device, restricted to [start, end) (opset 15; clamped, may be negative)."""
    start, end = node.attr("start", 0), node.attr("end")
    dims = list(inputs[0].shape)[int(start):None if end is None else int(end)]
    return (torch.tensor(dims, dtype=torch.int64, device=inputs[0].device),)


@converter("Size", since=1)
def size(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Number of elements of x as a 0-d int64 tensor on x's device."""
    return (torch.tensor(inputs[0].numel(), dtype=torch.int64, device=inputs[0].device),)


# --- constants -----------------------------------------------------------------------------------


@converter("Constant", since=1)
def constant(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """The tensor given by value, value_float(s) or value_int(s); sparse and string values unsupported.

    With no input to take a device from, the result is on the CPU.
    """
    if "value" in node.attrs:
        return (torch.tensor(np.array(node.attr("value"))),)
    if "value_float" in node.attrs:
        return (torch.tensor(float(node.attr("value_float")), dtype=torch.float32),)
    if "value_floats" in node.attrs:
        return (torch.tensor([float(v) for v in node.attr("value_floats")], dtype=torch.float32),)
    if "value_int" in node.attrs:
        return (torch.tensor(int(node.attr("value_int")), dtype=torch.int64),)
    if "value_ints" in node.attrs:
        return (torch.tensor(const_ints(node.attr("value_ints")), dtype=torch.int64),)
    raise unsupported(node, f"attribute {sorted(node.attrs)}")


@converter("ConstantOfShape", since=9)
def constant_of_shape(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """A tensor of the ``shape`` input filled with the 1-element ``value`` attribute (default float32 0)."""
    value = node.attr("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value)
    filled = np.full(const_ints(inputs[0]), value.reshape(-1)[0], dtype=value.dtype)
    return (torch.as_tensor(filled, device=inputs[0].device),)


@converter("Range", since=11)
def range_(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """start + i * delta for i < max(ceil((limit - start) / delta), 0), in start's dtype."""
    start, limit, delta = inputs
    first, last, step = (numpy_value(t).item() for t in (start, limit, delta))
    count = max(math.ceil((last - first) / step), 0)
    steps = torch.arange(count, dtype=start.dtype, device=start.device)
    return (start.reshape(()) + steps * delta.reshape(()),)


@converter("Trilu", since=14)
def trilu(node: OpNode, inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """The upper (``upper=1``) or lower triangle of the last two dims, from diagonal ``k``; the rest 0.

    Exporters write causal attention masks this way (torch.triu / torch.tril)."""
    k = optional_input(inputs, 1)
    diagonal = 0 if k is None else const_ints(k)[0]
    fn = torch.triu if int(node.attr("upper", 1)) else torch.tril
    return (fn(inputs[0], diagonal),)
