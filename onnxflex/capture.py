"""Capture: run the FP32 model in onnxruntime with block boundary tensors as extra outputs.

Captured tensors go into a TensorCache whose RAM use is bounded: beyond ``max_bytes`` new tensors
are files in a temporary folder, read and written by rows (DiskArray). The probe map (output name →
tensor name) is explicit.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnxflex.calib import CalibrationSet, fixed_batch
from onnxflex.errors import UnsupportedModelError
from onnxflex.layout import Layout, follows_batch
from onnxflex.ort import session


class TensorCache:
    """Named arrays with samples on dim 0 (shared tensors, see ``layout``, once), in RAM up to ``max_bytes`` and DiskArray files beyond."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.ram_bytes = 0
        self.layout = Layout()  # the model's batch axis of each captured tensor (None: stored once, shared)
        self.num_samples = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._dir: tempfile.TemporaryDirectory | None = None

    def allocate(self, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.ram_bytes + nbytes <= self.max_bytes:
            array = np.empty(shape, dtype)
            self.ram_bytes += nbytes
        else:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="onnxflex-cache-")
            path = Path(self._dir.name) / f"{len(self._arrays)}.bin"
            array = DiskArray(path, shape, dtype)
        old = self._arrays.get(key)
        if isinstance(old, DiskArray):
            old.close()
        self._arrays[key] = array
        return array

    def record(self, layout: Layout, num_samples: int) -> None:
        """Mutates: adds ``layout``'s tensors to ``self.layout``; sets the sample count."""
        self.layout = self.layout.merged(layout.axes)
        self.num_samples = num_samples

    def put(self, key: str, array: np.ndarray) -> None:
        self.allocate(key, array.shape, array.dtype)[...] = array

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays[key]

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    @property
    def spilled(self) -> bool:
        return self._dir is not None

    def close(self) -> None:
        for array in self._arrays.values():
            if isinstance(array, DiskArray):
                array.close()
        self._arrays.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class DiskArray:
    """A spilled cache entry: an array with samples on dim 0 in a file, read and written by rows with
    plain file I/O. Nothing is memory-mapped, so what a read returns is the only copy the process
    holds, and a run's resident memory does not grow with the number of samples spilled.

    Indexing on dim 0 only: ``a[i:j]`` (step 1), ``a[int]``, ``a[index array]`` return new arrays;
    ``a[i:j] = value`` writes rows.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(int(d) for d in shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, self.shape[0] * self.row_bytes)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[0:self.shape[0]]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step == 1:
                out = np.empty((max(stop - start, 0),) + self.shape[1:], self.dtype)
                self._read(out, start)
                return out
            index = np.arange(start, stop, step)
        if isinstance(index, (int, np.integer)):
            return self[int(index):int(index) + 1][0]
        rows = np.asarray(index).reshape(-1).astype(np.int64) % max(self.shape[0], 1)
        out = np.empty((len(rows),) + self.shape[1:], self.dtype)
        for i, row in enumerate(rows.tolist()):
            self._read(out[i:i + 1], row)
        return out

    def __setitem__(self, index: slice, value) -> None:
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise IndexError("DiskArray writes take contiguous row ranges")
        data = np.ascontiguousarray(value, dtype=self.dtype).reshape((stop - start,) + self.shape[1:])
        view, offset = memoryview(data).cast("B"), start * self.row_bytes
        while len(view):
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def _read(self, out: np.ndarray, row: int) -> None:
        view, offset = memoryview(out).cast("B"), row * self.row_bytes
        while len(view):
            got = os.preadv(self._fd, [view], offset)
            if got <= 0:
                raise OSError(f"short read from the capture cache file {self.path}")
            view, offset = view[got:], offset + got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
                  folded_as_shared: bool = False) -> Layout:
    """The batch axis of each of ``sess``'s outputs ``names``: the axis whose length follows the batch
    between runs on 1 and 2 samples of ``data`` (on ``fixed`` samples when the model fixes its batch;
    one run when ``data`` has one sample); a tensor with none is shared. Raises UnsupportedModelError
    for a tensor whose shape changes with the batch on no single axis (samples folded into another),
    unless ``folded_as_shared`` (statistics over whole batches, as compare takes them): then it counts
    as shared too."""
    sizes = [fixed] if fixed else [1, 2] if data.num_samples >= 2 else [1]
    shapes: dict[str, dict[int, tuple[int, ...]]] = {name: {} for name in names}
    for size in sizes:
        for name, value in zip(names, sess.run(names, data.feeds(0, size))):
            shapes[name][size] = tuple(value.shape)
    axes = {}
    for name, by_size in shapes.items():
        axis = follows_batch(by_size)
        if axis == "varies" and folded_as_shared:
            axis = None
        elif axis == "varies":
            raise UnsupportedModelError(
                f"tensor {name!r} changes shape with the batch {list(by_size.values())} but no axis carries the "
                "samples (they are folded into another axis); keep its producer and consumers in one block "
                "(--granularity model) or exclude them with --exclude-node")
        axes[name] = axis
    return Layout(axes)


def capture(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, cache: TensorCache,
            providers: list[str], prefix: str = "fp:", batch: int = 64, progress=None) -> None:
    """Run ``model`` over ``data`` and store each tensor in ``cache`` under ``prefix + name``, samples on
    dim 0 (a shared tensor once); records each tensor's batch axis in ``cache.layout``."""
    probed, probes = with_probes(model, tensors)
    sess = session(probed, providers)
    fixed = fixed_batch(model)
    names = list(probes)
    layout = tensor_layout(sess, names, data, fixed)
    cache.record(layout, data.num_samples)
    n, start = data.num_samples, 0
    for feeds in data.batches(fixed or batch):
        outs = sess.run(names, feeds)
        count = min(fixed or batch, n - start)
        for out_name, value in zip(names, outs):
            name = probes[out_name]
            if layout.shared(name):
                if start == 0:
                    cache.put(prefix + name, value)
                continue
            value = layout.to_samples(name, value)
            if prefix + name not in cache:
                cache.allocate(prefix + name, (n,) + value.shape[1:], value.dtype)
            cache[prefix + name][start:start + count] = value
        start += count
        if progress is not None:
            progress(start, n)
