"""The tensor store between capture and reconstruction, with a RAM bound.

Two runs fill it: capture stores the float model's block boundary tensors over the calibration samples
(the FP run), and reconstruction adds what the frozen quantized blocks compute, with the quantized
graph inputs (the quantized run). An entry is named by a typed Key (run, tensor name), never by a
string built from the name. Block reconstruction reads a block's tensors through the three accessors
``fp_inputs``, ``fp_outputs`` and ``q_inputs``.

Beyond ``max_bytes`` new entries are files in a temporary folder, read and written by rows (DiskArray).
"""
from __future__ import annotations

import enum
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxflex.blocks import Block
from onnxflex.layout import Layout


class Run(enum.Enum):
    """Which computation a cached tensor comes from."""

    FP = "fp"  # the float model on the calibration samples (capture)
    Q = "q"  # the quantized path: frozen quantized blocks on quantized inputs (reconstruction)


@dataclass(frozen=True)
class Key:
    """A cache entry: tensor ``tensor`` (a name of the float model) as run ``run`` computed it."""

    run: Run
    tensor: str

    @classmethod
    def fp(cls, tensor: str) -> Key:
        return cls(Run.FP, tensor)

    @classmethod
    def q(cls, tensor: str) -> Key:
        return cls(Run.Q, tensor)


def batch_within(size: int, per_sample: int, max_bytes: int) -> int:
    """At most ``size`` samples, and at least 1: fewer when their ``per_sample`` bytes each would pass a
    quarter of the cache's RAM bound ``max_bytes``, so that one batch's tensors, held beside what the
    cache keeps, stay a fraction of it."""
    return max(1, min(size, max_bytes // 4 // max(per_sample, 1)))


class TensorCache:
    """Arrays by Key with samples on dim 0 (shared tensors, see ``layout``, once), in RAM up to
    ``max_bytes`` and DiskArray files beyond."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.ram_bytes = 0
        self.layout = Layout()  # the model's batch axis of each captured tensor (None: stored once, shared)
        self.num_samples = 0
        self._arrays: dict[Key, np.ndarray | DiskArray] = {}
        self._released: list[DiskArray] = []  # spilled entries dropped by release, open until close
        self._files = 0  # spill files made so far
        self._dir: tempfile.TemporaryDirectory | None = None

    def record(self, layout: Layout, num_samples: int) -> None:
        """Mutates: adds ``layout``'s tensors to ``self.layout``; sets the sample count."""
        self.layout = self.layout.merged(layout.axes)
        self.num_samples = num_samples

    def write(self, key: Key, start: int, rows: np.ndarray, total: int | None = None) -> None:
        """Mutates: stores ``rows`` (samples on dim 0) as samples ``start:start + len(rows)`` of ``key``,
        a new entry of ``total`` rows (default ``num_samples``: the first ``total`` samples when fewer)
        when ``start`` is 0 (it replaces an older one). A shared tensor (``layout``) is one value for
        every sample: stored whole from the first batch only."""
        if self.layout.shared(key.tensor):
            if start == 0:
                self._allocate(key, rows.shape, rows.dtype)[...] = rows
            return
        if start == 0:
            self._allocate(key, (self.num_samples if total is None else total,) + rows.shape[1:], rows.dtype)
        self._arrays[key][start:start + len(rows)] = rows

    def hold(self, key: Key, array: np.ndarray) -> bool:
        """Mutates: keeps ``array`` itself (samples on dim 0; not copied: nothing writes into it) as the
        entry of ``key`` when the RAM bound allows its bytes, which then count as held; returns whether
        it did (else the caller writes the entry, which may spill)."""
        if self.ram_bytes + array.nbytes > self.max_bytes:
            return False
        old = self._arrays.get(key)
        if isinstance(old, DiskArray):
            old.close()
        self._arrays[key] = array
        self.ram_bytes += array.nbytes
        return True

    def fp_inputs(self, block: Block) -> dict[str, np.ndarray | DiskArray]:
        """The block's inputs as the float model computes them, by tensor name."""
        return {name: self[Key.fp(name)] for name in block.inputs}

    def fp_outputs(self, block: Block) -> dict[str, np.ndarray | DiskArray]:
        """The block's outputs as the float model computes them (its reconstruction targets)."""
        return {name: self[Key.fp(name)] for name in block.outputs}

    def q_inputs(self, block: Block) -> dict[str, np.ndarray | DiskArray]:
        """The block's inputs on the quantized path; an input the quantized path leaves as it is (a
        graph input with no act point) is the FP entry itself, the same object ``fp_inputs`` returns."""
        return {name: self[Key.q(name)] if Key.q(name) in self else self[Key.fp(name)] for name in block.inputs}

    def __getitem__(self, key: Key) -> np.ndarray | DiskArray:
        return self._arrays[key]

    def release(self, tensors) -> None:
        """Mutates: drops the FP and q: entries of ``tensors`` (names); the RAM of those held in memory
        counts free again for later entries. An array a caller still holds stays valid for it: a spilled
        entry's file stays open until ``close`` (a block's row readers may still hold it)."""
        for name in tensors:
            for key in (Key.fp(name), Key.q(name)):
                array = self._arrays.pop(key, None)
                if isinstance(array, DiskArray):
                    self._released.append(array)
                elif array is not None:
                    self.ram_bytes -= array.nbytes

    def __contains__(self, key: Key) -> bool:
        return key in self._arrays

    @property
    def spilled(self) -> bool:
        return self._dir is not None

    def close(self) -> None:
        for array in [*self._arrays.values(), *self._released]:
            if isinstance(array, DiskArray):
                array.close()
        self._arrays.clear()
        self._released.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _allocate(self, key: Key, shape: tuple[int, ...], dtype) -> np.ndarray | DiskArray:
        """A new entry for ``key``: in RAM while the RAM bound allows, else a file in the spill folder
        (a 0-d value, which a file of rows cannot hold, stays in RAM: it is one number)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.ram_bytes + nbytes <= self.max_bytes or not shape:
            array = np.empty(shape, dtype)
            self.ram_bytes += nbytes
        else:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="onnxflex-cache-")
            self._files += 1  # never reused: entries released earlier may still be open
            array = DiskArray(Path(self._dir.name) / f"{self._files}.bin", shape, dtype)
        old = self._arrays.get(key)
        if isinstance(old, DiskArray):
            old.close()
        self._arrays[key] = array
        return array
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
