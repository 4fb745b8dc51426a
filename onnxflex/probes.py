"""Probed models: a copy of a model with inner tensors as extra outputs, and what runs of it measure.

The probe map (output name → tensor name) is explicit; nothing is parsed back from output names. Users:
capture (block boundaries), compare and verification (each tensor's batch axis), the onnxruntime
fallback block, and the refiners that need per-channel ranges (LayerNorm folding, latency placement).
"""
from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx

from onnxflex.calib import CalibrationSet, fixed_batch
from onnxflex.errors import UnsupportedModelError
from onnxflex.layout import Layout, follows_batch
from onnxflex.ort import session


def with_probes(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` that also outputs ``tensors``; returns it and the probe map output → tensor."""
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    existing = {o.name for o in probed.graph.output}
    typed = {vi.name: vi for vi in list(probed.graph.value_info) + list(probed.graph.input)}
    probes = {}
    for name in tensors:
        if name not in existing:
            vi = typed.get(name)
            out = probed.graph.output.add()
            if vi is not None:
                out.CopyFrom(vi)
            else:
                out.name = name
            existing.add(name)
        probes[name] = name
    return probed, probes


def channel_ranges(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, providers,
                   batch: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (last axis) min and max of each tensor over the samples of ``data``, run batch by
    batch with the tensors as extra outputs (nothing is kept but the running ranges)."""
    probed, _ = with_probes(model, tensors)
    sess = session(probed, list(providers))
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for feeds in data.batches(fixed_batch(model) or batch):
        for name, value in zip(tensors, sess.run(tensors, feeds)):
            flat = value.reshape(-1, value.shape[-1])
            lo, hi = flat.min(0), flat.max(0)
            if name in ranges:
                lo, hi = np.minimum(ranges[name][0], lo), np.maximum(ranges[name][1], hi)
            ranges[name] = (lo, hi)
    return ranges


def tensor_layout(sess, names: list[str], data: CalibrationSet, fixed: int | None, *,
                  folded_as_shared: bool | Collection[str] = False) -> Layout:
    """The batch axis of each of ``sess``'s outputs ``names``: the axis whose length follows the batch
    between runs on 1 and 2 samples of ``data`` (on ``fixed`` samples when the model fixes its batch;
    one run when ``data`` has one sample); a tensor with none is shared. Raises UnsupportedModelError
    for a tensor whose shape changes with the batch on no single axis (samples folded into another),
    unless ``folded_as_shared`` (statistics over whole batches, as compare takes them; a collection:
    for the tensors in it): then it counts as shared too."""
    sizes = [fixed] if fixed else [1, 2] if data.num_samples >= 2 else [1]
    shapes: dict[str, dict[int, tuple[int, ...]]] = {name: {} for name in names}
    for size in sizes:
        for name, value in zip(names, sess.run(names, data.feeds(0, size))):
            shapes[name][size] = tuple(value.shape)
    axes = {}
    for name, by_size in shapes.items():
        axis = follows_batch(by_size)
        lenient = folded_as_shared if isinstance(folded_as_shared, bool) else name in folded_as_shared
        if axis == "varies" and lenient:
            axis = None
        elif axis == "varies":
            raise UnsupportedModelError(
                f"tensor {name!r} changes shape with the batch {list(by_size.values())} but no axis carries the "
                "samples (they are folded into another axis); keep its producer and consumers in one block "
                "(--granularity model) or exclude them with --exclude-node")
        axes[name] = axis
    return Layout(axes)
