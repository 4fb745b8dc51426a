"""The free-disk check before a run: what the capture cache will spill, estimated from the plan.

Capture keeps every block boundary tensor over the calibration samples (the FP run, ``Key.fp``), and
reconstruction adds the quantized path's block outputs and inputs (``Key.q``), about as many again; what
exceeds ``max_cache_mb`` goes to files in a temporary folder (cache.TensorCache). Shapes come from onnx's
shape inference with the inputs fixed to one calibration sample, so the check costs no model run;
tensors whose shape inference cannot tell are not counted (the estimate is then low, never high).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np
import onnx
from onnx import helper

from onnxflex.cache import Run
from onnxflex.calib import CalibrationSet
from onnxflex.errors import DiskSpaceError
from onnxflex.graph import static_shapes

log = logging.getLogger("onnxflex")

MIB = 1 << 20


def tensor_bytes(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet) -> dict[str, int]:
    """Bytes per sample of each of ``tensors`` whose shape inference finds a static shape, on one sample
    of ``data`` (fed in the model's layout)."""
    shapes = static_shapes(model, data.feeds(0, 1))
    out = {}
    for name in tensors:
        if name in shapes and shapes[name][1]:
            shape, elem = shapes[name]
            out[name] = int(np.prod(shape)) * np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize
    return out


def spill_estimate(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, max_bytes: int) -> int:
    """Bytes the cache will write to disk: one copy of ``tensors`` (the plan's block
    boundaries) per Run the cache holds (FP and quantized) over ``data``'s samples, less the ``max_bytes`` kept in RAM."""
    per_sample = sum(tensor_bytes(model, tensors, data).values())
    return max(0, len(Run) * per_sample * data.num_samples - max_bytes)


def check_free_disk(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, max_cache_mb: int) -> None:
    """Raises DiskSpaceError when the temporary folder's disk has less room than the spill needs."""
    need = spill_estimate(model, tensors, data, max_cache_mb * MIB)
    if not need:
        return
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DiskSpaceError(
            f"captured tensors need about {need / MIB:,.0f} MiB of disk beyond --max-cache-mb {max_cache_mb} "
            f"(RAM), spilled to {folder!r}, but its disk has {free / MIB:,.0f} MiB free: set TMPDIR to a "
            "folder on a larger disk, raise --max-cache-mb, or use fewer samples (--calib-samples)")
    log.info("captured tensors will spill about %.0f MiB to %s (%.0f MiB free)", need / MIB, folder, free / MIB)


def file_backed(array: np.ndarray) -> np.ndarray:
    """``array``'s values in a memory map of an unlinked file in the temporary folder: its pages are
    the page cache's, written back and dropped under memory pressure instead of counting against the
    run's own memory (the mapping keeps the file until the array is gone)."""
    fd, path = tempfile.mkstemp(prefix="onnxflex-weights-", suffix=".bin")
    try:
        os.close(fd)
        mapped = np.memmap(path, dtype=array.dtype, mode="w+", shape=array.shape)
        mapped[...] = array
    finally:
        os.unlink(path)
    return mapped
