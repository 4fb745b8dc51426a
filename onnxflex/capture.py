"""Capture: run the FP32 model in onnxruntime with block boundary tensors as extra outputs.

Captured tensors go into a TensorCache whose RAM use is bounded: beyond ``max_bytes`` new tensors
are memory-mapped files in a temporary folder. The probe map (output name → tensor name) is explicit.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxflex.calib import CalibrationSet, fixed_batch


class TensorCache:
    """Named arrays with samples on dim 0, in RAM up to ``max_bytes`` and memory-mapped beyond."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.ram_bytes = 0
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
            array = np.memmap(path, dtype=dtype, mode="w+", shape=shape)
        self._arrays[key] = array
        return array

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
        self._arrays.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


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


def session(model: onnx.ModelProto, providers: list[str], threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


def capture(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, cache: TensorCache,
            providers: list[str], prefix: str = "fp:", batch: int = 64, progress=None) -> None:
    """Run ``model`` over ``data`` and store each tensor in ``cache`` under ``prefix + name``."""
    probed, probes = with_probes(model, tensors)
    sess = session(probed, providers)
    fixed = fixed_batch(model)
    step = fixed or batch
    n = data.num_samples
    names = list(probes)
    start = 0
    for feeds in data.batches(step):
        outs = sess.run(names, feeds)
        for out_name, value in zip(names, outs):
            key = prefix + probes[out_name]
            if key not in cache:
                cache.allocate(key, (n,) + value.shape[1:], value.dtype)
            cache[key][start:start + value.shape[0]] = value
        start += len(next(iter(feeds.values())))
        if progress is not None:
            progress(start, n)
