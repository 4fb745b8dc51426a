"""The free-disk check before a run: what the capture cache will spill, estimated from the plan.

Capture keeps every block boundary tensor over the calibration samples (the FP run, ``Key.fp``), and
reconstruction adds the quantized path's block outputs and inputs (``Key.q``), about as many again; what
exceeds ``max_cache_mb`` goes to files in a temporary folder (cache.TensorCache). Shapes come from onnx's
shape inference with the inputs fixed to one calibration sample, so the check costs no model run;
tensors whose shape inference cannot tell are not counted (the estimate is then low, never high).
"""
from __future__ import annotations

import logging
import shutil
import tempfile

import numpy as np
import onnx

from onnxflex.cache import Run
from onnxflex.calib import CalibrationSet
from onnxflex.errors import DiskSpaceError

log = logging.getLogger("onnxflex")

MIB = 1 << 20
SMALL_INIT = 4096  # initializers up to this many elements stay in the shape model (shape constants)


def tensor_bytes(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet) -> dict[str, int]:
    """Bytes per sample of each of ``tensors`` whose shape inference finds a static shape, on one sample
    of ``data`` (fed in the model's layout)."""
    from onnx import helper, shape_inference

    feeds = data.feeds(0, 1)
    graph = onnx.GraphProto()
    graph.node.extend(model.graph.node)
    graph.output.extend(model.graph.output)
    for vi in model.graph.input:
        if vi.name in feeds:
            value = np.asarray(feeds[vi.name])
            graph.input.append(helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, value.shape))
    for init in model.graph.initializer:  # big weights become typed inputs: inference needs their shape only
        if int(np.prod(init.dims)) <= SMALL_INIT and init.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(init)
        else:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    shaped = helper.make_model(graph, opset_imports=model.opset_import)
    shaped.ir_version = model.ir_version
    try:
        inferred = shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception as exc:  # inference is an estimate's helper, never a reason to stop the run
        log.debug("shape inference for the spill estimate failed: %s", exc)
        return {}
    known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
             + list(inferred.graph.input)}
    out = {}
    for name in tensors:
        vi = known.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        elem = vi.type.tensor_type.elem_type
        if None in dims or not elem:
            continue
        out[name] = int(np.prod(dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize
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
