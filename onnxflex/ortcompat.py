"""A user's model as the installed onnxruntime reads it: headers real exporters write, made loadable.

onnx 1.23 saves IR version 14 by default and onnxruntime 1.31 reads at most 13; legacy exporters
declare a dynamic batch as ``dim_value: -1`` or ``0`` (onnxruntime takes 0 for a fixed size 0).
``for_onnxruntime`` fixes both in a copy and lowers an opset newer than onnxruntime knows when
onnx.version_converter can; every onnxruntime session onnxflex opens on a model goes through it
(capture.session). What the installed onnxruntime reads is found once, by loading tiny models.
"""
from __future__ import annotations

import functools

import onnx
from onnx import TensorProto, helper

from onnxflex.errors import UnsupportedModelError
from onnxflex.graph import default_opset, set_default_opset

OLDEST_IR = 7  # onnx 1.6; every onnxruntime onnxflex supports reads it


def _loads(ir_version: int, opset: int) -> bool:
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own pybind types
        return False
    return True


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """The newest IR version the installed onnxruntime loads (at most the installed onnx's)."""
    return next((ir for ir in range(onnx.IR_VERSION, OLDEST_IR, -1) if _loads(ir, 13)), OLDEST_IR)


@functools.lru_cache(maxsize=None)
def max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads (at most the installed onnx's)."""
    ir = max_ir_version()
    return next((op for op in range(onnx.defs.onnx_opset_version(), 13, -1) if _loads(ir, op)), 13)


def unknown_dims_as_values(model: onnx.ModelProto) -> list[onnx.TensorShapeProto.Dimension]:
    """The dims of the graph inputs and outputs declared unknown by a non-positive dim_value."""
    return [d for vi in list(model.graph.input) + list(model.graph.output)
            for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value") and d.dim_value <= 0]


def clear_unknown_dims(model: onnx.ModelProto) -> int:
    """Mutates ``model``: graph input/output dims written as dim_value <= 0 become unset (unknown), as
    onnxruntime and the onnx checker read them. Returns how many it changed."""
    dims = unknown_dims_as_values(model)
    for dim in dims:
        dim.Clear()
    return len(dims)


def for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when the installed onnxruntime loads its header, else a copy with unknown dims
    cleared, the opset lowered by onnx.version_converter and the IR version lowered to the least its
    opsets need. Raises UnsupportedModelError when the opset is newer than onnxruntime knows and
    cannot be converted down."""
    opset = default_opset(model)
    newer_opset = opset > max_opset()
    if not (newer_opset or model.ir_version > max_ir_version() or unknown_dims_as_values(model)):
        return model
    if newer_opset:
        out = _lower_opset(model, opset)
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    clear_unknown_dims(out)
    if out.ir_version > max_ir_version():
        out.ir_version = helper.find_min_ir_version_for(list(out.opset_import), ignore_unknown=True)
    return out


def _lower_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    import onnxruntime as ort
    from onnx import version_converter

    newest = max_opset()
    try:
        out = version_converter.convert_version(model, newest)
    except Exception as exc:  # the converter raises RuntimeError or its own C++ types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"model opset {opset} is newer than onnxruntime {ort.__version__} reads (at most {newest}) and "
            f"onnx.version_converter cannot lower it ({reason}); re-export the model with opset <= {newest} "
            "or upgrade onnxruntime") from None
    set_default_opset(out, newest)
    return out
