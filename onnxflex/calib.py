"""Calibration data: load it, check it against the model's inputs, hand it out in batches."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from onnxflex.batchaxes import find_axes, pinned_values, shared_value
from onnxflex.errors import CalibrationError
from onnxflex.graph import graph_input_names
from onnxflex.inputs import NP_TYPES, InputOptions, input_dims, model_inputs, show_dims
from onnxflex.layout import Layout

log = logging.getLogger("onnxflex")


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration inputs by model input name.

    ``arrays``: the batched inputs, every one with the same number of samples on dim 0 (whatever axis
    the model carries them on: ``layout`` records it). ``shared``: inputs with one value for every
    sample (0-d inputs, pinned inputs, unbatched tensors), in the model's layout. ``batches`` and
    ``feeds`` hand out feed dicts in the model's layout, as onnxruntime takes them."""

    arrays: dict[str, np.ndarray]
    source: str
    layout: Layout = field(default_factory=Layout)
    shared: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # what checking the data cast (check_calibration logs them too)

    @property
    def num_samples(self) -> int:
        return next(iter(self.arrays.values())).shape[0] if self.arrays else 1

    def take(self, start: int, stop: int) -> "CalibrationSet":
        return replace(self, arrays={k: v[start:stop] for k, v in self.arrays.items()})

    def feeds(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Samples [start, stop) of every input, each in the model's layout (shared ones as they are)."""
        batched = {k: self.layout.to_model(k, v[start:stop]) for k, v in self.arrays.items()}
        return {**batched, **self.shared}

    def batches(self, batch: int):
        for start in range(0, self.num_samples, batch):
            yield self.feeds(start, start + batch)


def default_calibration_path(model_path: str | Path) -> Path | None:
    """``<model stem>.calib.npz`` beside the model (how the bundled models ship their data), if present."""
    path = Path(model_path)
    candidate = path.with_name(path.name[:-len(path.suffix)] + ".calib.npz") if path.suffix else None
    return candidate if candidate is not None and candidate.is_file() else None


def load_npz(path: str | Path, model: onnx.ModelProto, options: InputOptions | None = None) -> CalibrationSet:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist; pass --calib FILE.npz")
    return check_calibration(read_npz(path), model, str(path), options or InputOptions())


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


def check_calibration(arrays: Mapping[str, np.ndarray], model: onnx.ModelProto, source: str,
                      options: InputOptions = InputOptions()) -> CalibrationSet:
    """Match arrays (each in the model's layout: samples on the input's batch axis, or one shared value)
    to the model inputs by name; find each input's batch axis (batchaxes.find_axes); check rank, fixed
    dims, dtype (cast to the input's where no information is lost: see _typed; each cast is a warning,
    logged and kept in ``warnings``) and finiteness; store samples on dim 0."""
    inputs = model_inputs(model)
    pinned = pinned_values(inputs, options, source)
    missing = [n for n in inputs if n not in arrays and n not in pinned]
    if missing:
        raise CalibrationError(
            f"{source}: no data for model input(s) {', '.join(missing)}; it holds {', '.join(sorted(arrays)) or 'nothing'}"
            " — store one array per model input under the input's name (or pin it with --fix-input NAME=VALUE)")
    warnings: list[str] = []
    scaled = scaled_in_graph(model)
    given = {n: _typed(n, np.asarray(arrays[n]), vi, source, warnings, n in scaled) for n, vi in inputs.items()
             if n not in pinned}
    for warning in warnings:
        log.warning(warning)
    axes = find_axes(given, inputs, options.batch_axes, fixed_batch(model) is not None, source)
    layout = Layout({**axes, **{n: None for n in pinned}})
    batched, shared = {}, dict(pinned)
    for name, array in given.items():
        _check_dims(name, array, input_dims(inputs[name]), axes[name], source)
        if axes[name] is None:
            shared[name] = shared_value(name, array, len(input_dims(inputs[name])), source)
        else:
            batched[name] = np.ascontiguousarray(layout.to_samples(name, array))
    counts = {n: a.shape[0] for n, a in batched.items()}
    if batched and min(counts.values()) == 0:
        raise CalibrationError(f"{source}: calibration data is empty")
    return CalibrationSet(batched, source, layout, shared, tuple(warnings))


SCALING_OPS = {"Div", "Mul", "Sub", "Add", "BatchNormalization"}


def scaled_in_graph(model: onnx.ModelProto) -> set[str]:
    """Graph inputs the model scales itself before anything else reads them: every consumer is a Div,
    Mul, Sub, Add (by a constant) or BatchNormalization, as exports with their preprocessing inside
    (x / 255, mean/std) write it. Such an input takes unscaled values."""
    constants = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                            for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)

    def scales(node: onnx.NodeProto, name: str) -> bool:
        others = [x for x in node.input if x and x != name]
        return node.op_type in SCALING_OPS and bool(others) and all(x in constants for x in others)

    return {i.name for i in model.graph.input
            if consumers.get(i.name) and all(scales(n, i.name) for n in consumers[i.name])}


def _typed(name: str, array: np.ndarray, vi: onnx.ValueInfoProto, source: str, warnings: list[str],
           scales_itself: bool = False) -> np.ndarray:
    """``array`` in the input's dtype. Refuses NaN/Inf and any cast that loses information (_lossy; an
    input the graph scales itself takes unscaled integers); appends a warning to ``warnings`` for every
    cast it makes."""
    elem = vi.type.tensor_type.elem_type
    dtype = NP_TYPES.get(elem)
    if dtype is None:
        raise CalibrationError(f"{source}: input {name!r} has an ONNX type onnxflex cannot feed ({elem})")
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise CalibrationError(f"{source}: input {name!r} contains NaN or Inf values")
    want = np.dtype(dtype)
    if array.dtype != want:
        problem = _lossy(array, want, scales_itself) if array.size else None
        if problem:
            raise CalibrationError(f"{source}: input {name!r} is {want.name} but the data is {array.dtype.name} "
                                   f"{problem}")
        warnings.append(f"{source}: input {name!r} is {want.name}; its {array.dtype.name} data was cast to "
                        f"{want.name} (store it as {want.name} to silence this)")
    array = array.astype(dtype, copy=False)
    return np.ascontiguousarray(array) if array.ndim else array  # ascontiguousarray makes 0-d arrays 1-d


def _lossy(array: np.ndarray, want: np.dtype, scales_itself: bool = False) -> str | None:
    """Why casting ``array`` to ``want`` would change what the model sees (the rest of the error message),
    or None when the cast is safe:

    - to an integer or bool input: values it cannot hold, fractional values (float data), or for bool
      anything but 0 and 1;
    - integer data to a float input: any value outside [-1, 1]. Float inputs take scaled values (pixels
      as x / 255 or mean/std-normalized, features standardized); integers beyond ±1 are unscaled data
      (pixels 0-255, raw counts) far from the range the model was trained on, and onnxflex does not guess
      the scaling. Integer data within [-1, 1] (masks, signs) casts exactly, and so does any integer
      data for an input the graph scales itself (``scales_itself``: its first ops divide, multiply
      or shift it by constants);
    - float data to a float16 input: values beyond float16's range (they would become Inf).
    """
    lo, hi = array.min(), array.max()
    if want.kind == "b":
        if lo < 0 or hi > 1 or (array.dtype.kind == "f" and np.any(array != np.round(array))):
            return f"with values {lo}..{hi}: a bool input takes 0/1 (False/True) only; store it as bool"
        return None
    if want.kind in "iu":
        info = np.iinfo(want)
        if lo < info.min or hi > info.max:
            return f"holding values {lo}..{hi} outside {info.min}..{info.max}"
        if array.dtype.kind == "f":
            fractional = array[array != np.round(array)]
            if fractional.size:
                return (f"with fractional values (e.g. {fractional.flat[0]:g}) that {want.name} cannot hold: "
                        f"store the integers the model takes (ids, indices, counts) as {want.name}")
        return None
    if array.dtype.kind in "iub" and (lo < -1 or hi > 1) and not scales_itself:
        return (f"with values {lo}..{hi}: integer data for a float input is unscaled (pixels 0-255, raw counts) "
                f"and a float input takes values scaled as in training; store it as {want.name}, scaled the "
                "way the model expects (e.g. x / 255, or the exporter's mean/std), or as plain "
                f"{want.name}(x) if these integers are what the model takes")
    if want == np.float16 and max(abs(float(lo)), abs(float(hi))) > np.finfo(np.float16).max:
        return f"with values {lo}..{hi} beyond float16's range (±65504)"
    return None


def _check_dims(name: str, array: np.ndarray, dims: list[int | None], axis: int | None, source: str) -> None:
    """Every declared dim but the batch axis matches (a shared value may carry a leading sample axis)."""
    shape = list(array.shape)
    if axis is None and len(shape) == len(dims) + 1:
        shape = shape[1:]
    for k, (got, want) in enumerate(zip(shape, dims)):
        if k != axis and want is not None and got != want:
            raise CalibrationError(
                f"{source}: input {name!r} has shape {list(array.shape)} but the model expects {show_dims(dims)} "
                f"(dim {k} differs)")


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs fix on dim 0, or None when the batch dimension is dynamic."""
    sizes = set()
    for vi in model.graph.input:
        if vi.name in set(graph_input_names(model)):
            dims = input_dims(vi)
            if not dims or dims[0] is None:
                return None
            sizes.add(dims[0])
    return min(sizes) if sizes else None
