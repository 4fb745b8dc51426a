"""Calibration data: load it, check it against the model's inputs, hand it out in batches."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxflex.errors import CalibrationError
from onnxflex.graph import graph_input_names

NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
            onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
            onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8,
            onnx.TensorProto.BOOL: np.bool_}


@dataclass(frozen=True)
class CalibrationSet:
    """Arrays keyed by model input name, all with the same number of samples on dim 0."""

    arrays: dict[str, np.ndarray]
    source: str

    @property
    def num_samples(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def take(self, start: int, stop: int) -> "CalibrationSet":
        return CalibrationSet({k: v[start:stop] for k, v in self.arrays.items()}, self.source)

    def batches(self, batch: int):
        for start in range(0, self.num_samples, batch):
            yield {k: v[start:start + batch] for k, v in self.arrays.items()}


def default_calibration_path(model_path: str | Path) -> Path | None:
    """``<model stem>.calib.npz`` beside the model (how the bundled models ship their data), if present."""
    path = Path(model_path)
    candidate = path.with_name(path.name[:-len(path.suffix)] + ".calib.npz") if path.suffix else None
    return candidate if candidate is not None and candidate.is_file() else None


def load_npz(path: str | Path, model: onnx.ModelProto) -> CalibrationSet:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist; pass --calib FILE.npz")
    return check_calibration(read_npz(path), model, str(path))


def read_npz(path: str | Path, names=None) -> dict[str, np.ndarray]:
    """The arrays of an .npz (only those in ``names`` when given), without pickles."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files if names is None or k in names}
    except Exception as exc:
        raise CalibrationError(_unreadable_npz(Path(path), exc)) from exc


def _unreadable_npz(path: Path, exc: Exception) -> str:
    """Why ``path`` is no .npz, in the user's terms: an ONNX model or another file passed by mistake."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":  # an .npz is a zip archive
        what = "an ONNX model" if path.suffix == ".onnx" else "not an .npz archive (a zip of .npy arrays)"
        return (f"{str(path)!r} is {what}, not calibration data; pass --calib FILE.npz with one array per "
                "model input (samples on dim 0), or a folder of .npy/.npz files or images")
    return f"{str(path)!r} is not a readable .npz file: {exc}"


def check_calibration(arrays: dict[str, np.ndarray], model: onnx.ModelProto, source: str) -> CalibrationSet:
    """Match arrays to the model inputs by name, check rank, fixed dims, dtype and finiteness."""
    inputs = {i.name: i for i in model.graph.input if i.name in set(graph_input_names(model))}
    missing = [n for n in inputs if n not in arrays]
    if missing:
        raise CalibrationError(
            f"{source}: no data for model input(s) {', '.join(missing)}; it holds {', '.join(sorted(arrays)) or 'nothing'}"
            " — store one array per model input under the input's name, samples on dim 0")
    checked = {}
    for name, vi in inputs.items():
        checked[name] = _check_array(name, np.asarray(arrays[name]), vi, source)
    counts = {n: a.shape[0] for n, a in checked.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{source}: inputs have different sample counts {counts}")
    if min(counts.values()) == 0:
        raise CalibrationError(f"{source}: calibration data is empty")
    return CalibrationSet(checked, source)


def input_dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    """The declared shape of a model input, None for a symbolic or unknown dimension."""
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def show_dims(dims) -> str:
    """[?, 1, 16, 16]: how error messages print a declared shape."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _check_array(name: str, array: np.ndarray, vi: onnx.ValueInfoProto, source: str) -> np.ndarray:
    t = vi.type.tensor_type
    dims = input_dims(vi)
    if array.ndim != len(dims):
        raise CalibrationError(
            f"{source}: input {name!r} has shape {list(array.shape)} but the model expects rank {len(dims)} "
            f"{show_dims(dims)} (samples on dim 0)")
    for axis, (got, want) in enumerate(zip(array.shape[1:], dims[1:]), start=1):
        if want is not None and got != want:
            raise CalibrationError(
                f"{source}: input {name!r} has shape {list(array.shape)} but the model expects {show_dims(dims)} "
                f"(dim {axis} differs)")
    dtype = NP_TYPES.get(t.elem_type)
    if dtype is None:
        raise CalibrationError(f"{source}: input {name!r} has an ONNX type onnxflex cannot feed ({t.elem_type})")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise CalibrationError(f"{source}: input {name!r} contains NaN or Inf values")
    return np.ascontiguousarray(array.astype(dtype, copy=False))


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs fix on dim 0, or None when the batch dimension is dynamic."""
    sizes = set()
    for vi in model.graph.input:
        if vi.name in set(graph_input_names(model)):
            dims = vi.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                sizes.add(dims[0].dim_value)
            else:
                return None
    return min(sizes) if sizes else None
