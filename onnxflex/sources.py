"""Calibration sources: everything ``quantize`` accepts as calibration, turned into a CalibrationSet.

Accepted: an .npz path, a folder of .npy/.npz files, a folder of images (``ImageFolder`` sets the
preprocessing), a {input name: array} mapping, an onnxruntime-style ``CalibrationDataReader``
(anything with ``get_next()`` returning feed dicts and then None), an iterable of feed dicts, a
CalibrationSet, or nothing: then the model's bundled ``<stem>.calib.npz``, else synthetic inputs.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxflex.calib import CalibrationSet, check_calibration, default_calibration_path, fixed_batch, load_npz, read_npz
from onnxflex.config import parse_input_shape
from onnxflex.errors import CalibrationError
from onnxflex.graph import consumers, graph_input_names
from onnxflex.images import IMAGE_SUFFIXES
from onnxflex.inputs import NP_TYPES, InputOptions, input_dims, model_inputs, show_dims
from onnxflex.options import DataOptions

log = logging.getLogger("onnxflex")


def resolve_calibration(calibration: Any, model: onnx.ModelProto, model_source: Any,
                        config: DataOptions) -> CalibrationSet:
    """Any accepted source (see the module docstring) → a CalibrationSet checked against ``model``, with
    ``config.batch_axes`` and ``config.fix_inputs`` applied (InputOptions). ``--input-shape`` shapes
    synthetic data only: with real data it is a warning (in the set's ``warnings``). A .txt path is text
    for a decoder (onnxflex.text), tokenized with ``config.tokenizer`` into windows of ``config.seq_len``."""
    from onnxflex.text import is_text, load_text

    if not is_text(calibration) and (config.tokenizer or config.seq_len):
        raise CalibrationError(f"--tokenizer and --seq-len tokenize a .txt calibration, but calibration comes from "
                               f"{_described(calibration)}: drop them or pass --calib corpus.txt")
    if is_text(calibration):
        model_path = Path(model_source) if isinstance(model_source, (str, os.PathLike)) else None
        data = load_text(Path(calibration), model, model_path, config.tokenizer, config.seq_len,
                         config.calib_samples or config.synthetic_samples, InputOptions.from_config(config))
    elif calibration is None:
        found = default_calibration_path(model_source) if isinstance(model_source, (str, os.PathLike)) else None
        if found is None:
            return synthetic_calibration(model, config)
        data = _resolve_given(found, model, InputOptions.from_config(config))
    else:
        data = _resolve_given(calibration, model, InputOptions.from_config(config))
    if not config.input_shapes:
        return data
    unused = (f"--input-shape {', '.join(config.input_shapes)} shapes synthetic data only, but calibration comes "
              f"from {data.source}: it changes nothing (drop it)")
    log.warning(unused)
    return replace(data, warnings=data.warnings + (unused,))


def _described(calibration: Any) -> str:
    if calibration is None:
        return "the model's bundled data or synthetic inputs"
    if isinstance(calibration, (str, os.PathLike)):
        return repr(str(calibration))
    return f"a {type(calibration).__name__}"


def _resolve_given(calibration: Any, model: onnx.ModelProto, options: InputOptions) -> CalibrationSet:
    if isinstance(calibration, CalibrationSet):
        given = {n: a for n, a in calibration.layout.axes.items() if a is not None}
        return check_calibration(calibration.feeds(), model, calibration.source,
                                 replace(options, batch_axes={**given, **options.batch_axes}))
    if isinstance(calibration, ImageFolder):
        return calibration.load(model)
    if isinstance(calibration, (str, os.PathLike)):
        return _from_path(Path(calibration), model, options)
    if isinstance(calibration, Mapping):
        return check_calibration({k: np.asarray(v) for k, v in calibration.items()}, model, "calibration mapping",
                                 options)
    if callable(getattr(calibration, "get_next", None)):
        return from_feeds(iter(calibration.get_next, None), model, f"{type(calibration).__name__}.get_next()",
                          options)
    if isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        return from_feeds(iter(calibration), model, f"{type(calibration).__name__} of feed dicts", options)
    raise CalibrationError(
        f"unsupported calibration source of type {type(calibration).__name__}; pass an .npz path, a folder, "
        "an ImageFolder, a mapping of input name to array, a CalibrationDataReader or an iterable of feed dicts")


def _from_path(path: Path, model: onnx.ModelProto, options: InputOptions) -> CalibrationSet:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
            return ImageFolder(path).load(model)
        arrays = [p for p in files if p.suffix in (".npy", ".npz")]
        if not arrays:
            raise CalibrationError(f"calibration folder {str(path)!r} holds no .npy, .npz or image files")
        return from_feeds((_feed_of_file(p, model) for p in arrays), model, f"folder {str(path)!r}", options)
    if path.suffix == ".npy":
        return from_feeds(iter([_feed_of_file(path, model)]), model, str(path), options)
    return load_npz(path, model, options)


def _feed_of_file(path: Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """An .npz is a feed dict; an .npy is the array of a single-input model."""
    if path.suffix == ".npz":
        return read_npz(path)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CalibrationError(f"{str(path)!r} is not a readable .npy file: {exc}") from exc
    names = graph_input_names(model)
    if len(names) != 1:
        raise CalibrationError(f"{str(path)!r}: .npy files feed single-input models only; this model has inputs "
                               f"{', '.join(names)} — store .npz files with one array per input name")
    return {names[0]: array}


def from_feeds(feeds: Iterable[Any], model: onnx.ModelProto, source: str,
               options: InputOptions = InputOptions()) -> CalibrationSet:
    """Join feed dicts ({input name: array}, each a batch in the model's layout or a single sample
    without the batch axis) along each input's batch axis; unbatched inputs must agree across feeds."""
    inputs = model_inputs(model)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in inputs if name not in options.fixed}
    count = 0
    for count, feed in enumerate(feeds, start=1):
        if not isinstance(feed, Mapping):
            raise CalibrationError(f"{source}: item {count} is a {type(feed).__name__}, not a dict of "
                                   f"{{input name: array}} for inputs {', '.join(inputs)}")
        unknown = sorted(set(feed) - set(inputs))
        if unknown:
            raise CalibrationError(f"{source}: item {count} feeds {', '.join(map(repr, unknown))}, which the model "
                                   f"does not have; its inputs are {', '.join(map(repr, inputs))}")
        for name, value in feed.items():
            if name in parts:
                parts[name].append(_as_batch(np.asarray(value), inputs[name], options))
    if count == 0:
        raise CalibrationError(f"{source}: the calibration source is empty: it yielded no feed dicts, expected "
                               f"dicts with {', '.join(map(repr, inputs))}")
    missing = [name for name, got in parts.items() if len(got) < count]
    if missing:
        raise CalibrationError(f"{source}: input {missing[0]!r} is missing from {count - len(parts[missing[0]])} "
                               f"of {count} feeds; every feed needs every model input (or --fix-input it)")
    from onnxflex.batchaxes import find_axes

    first = {n: got[0] for n, got in parts.items()}
    axes = find_axes(first, inputs, options.batch_axes, fixed_batch(model) is not None, source)
    arrays = {}
    for name, got in parts.items():
        axis = axes[name]
        try:
            arrays[name] = got[0] if axis is None else np.concatenate(got, axis=axis)
        except ValueError as exc:
            raise CalibrationError(f"{source}: feeds give input {name!r} different shapes "
                                   f"{sorted({a.shape for a in got})}: {exc}") from None
        if axis is None and any(not np.array_equal(a, got[0]) for a in got[1:]):
            raise CalibrationError(f"{source}: input {name!r} has no batch axis but the feeds give it different "
                                   f"values; give every feed the same value, or pin it with --fix-input {name}=VALUE")
    found = {n: a for n, a in axes.items() if a is not None}
    return check_calibration(arrays, model, source, replace(options, batch_axes={**options.batch_axes, **found}))


def _as_batch(array: np.ndarray, vi: onnx.ValueInfoProto, options: InputOptions) -> np.ndarray:
    """A single sample (one dim short of a batched input) with its batch axis put back: the one given by
    --batch-axis, else the input's only unknown dim, else axis 0."""
    dims = input_dims(vi)
    if array.ndim != len(dims) - 1 or None not in dims:
        return array
    return np.expand_dims(array, options.batch_axis(vi))


def synthetic_calibration(model: onnx.ModelProto, config: DataOptions) -> CalibrationSet:
    """Random inputs shaped from the model's signature (``config.input_shapes`` fills unknown dims):
    standard-normal floats, token ids below the vocabulary size for Gather indices, ones otherwise."""
    shapes = dict(parse_input_shape(s) for s in config.input_shapes)
    names = graph_input_names(model)
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise CalibrationError(f"--input-shape names {', '.join(unknown)}, which the model does not have; "
                               f"its inputs are {', '.join(names)}")
    rng = np.random.default_rng(config.seed)
    n = config.synthetic_samples
    options = InputOptions.from_config(config)
    arrays = {}
    for name, vi in model_inputs(model).items():
        if name in options.fixed:
            continue
        if not vi.type.tensor_type.shape.dim:  # a 0-d input: one value shared by every sample
            arrays[name] = _random_input(model, vi, [], rng)
            continue
        shape = _synthetic_shape(vi, shapes.get(name), n, options.batch_axis(vi))
        arrays[name] = _random_input(model, vi, shape, rng)
    log.warning("no calibration data given: quantizing on %d synthetic samples drawn from the input signature; "
                "accuracy will suffer — pass --calib with real inputs", n)
    return check_calibration(arrays, model, "synthetic data", options)


def _synthetic_shape(vi: onnx.ValueInfoProto, given: tuple[int, ...] | None, n: int, axis: int) -> list[int]:
    """The shape of ``n`` synthetic samples of input ``vi``, the samples on ``axis`` (InputOptions.batch_axis);
    ``given`` (--input-shape, the shape of one sample with 1 on that axis) fills the other unknown dims."""
    dims = input_dims(vi)
    if given is not None:
        if len(given) != len(dims) or any(d is not None and d != g for i, (d, g) in enumerate(zip(dims, given))
                                          if i != axis):
            raise CalibrationError(f"--input-shape {vi.name}:{'x'.join(map(str, given))} does not fit the model's "
                                   f"input {vi.name!r} of shape {show_dims(dims)}")
        dims = list(given)
    if any(d is None for i, d in enumerate(dims) if i != axis):
        example = "x".join("1" if i == axis else str(d) if d else "N" for i, d in enumerate(dims))
        raise CalibrationError(f"no calibration data and input {vi.name!r} has unknown dimensions {show_dims(dims)}: "
                               f"pass --calib, or --input-shape {vi.name}:{example} with N filled in")
    return [n if i == axis else d for i, d in enumerate(dims)]


def _random_input(model, vi, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    dtype = NP_TYPES.get(vi.type.tensor_type.elem_type)
    if dtype is None:
        raise CalibrationError(f"input {vi.name!r} has an ONNX type onnxflex cannot synthesise; pass --calib")
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    rows = _gather_rows(model, vi.name)
    if rows:
        return rng.integers(0, rows, size=shape).astype(dtype)
    return np.ones(shape, dtype)


def _gather_rows(model: onnx.ModelProto, name: str) -> int | None:
    """Rows of the constant table a Gather indexes with ``name`` (the vocabulary of token ids)."""
    tables = {t.name: t for t in model.graph.initializer}
    for node in consumers(model).get(name, []):
        if node.op_type == "Gather" and node.input[1] == name and node.input[0] in tables:
            return int(tables[node.input[0]].dims[0])
    return None


@dataclass(frozen=True)
class ImageFolder:
    """A folder of images and how to turn them into the model's input.

    size: (height, width) after resizing/cropping [default: the model input's spatial size].
    resize: resize the shorter side to this, then center-crop to ``size`` [default: resize straight to size].
    mean, std: per-channel, applied after scaling pixels by ``scale`` (1/255 → [0, 1]).
    layout: 'NCHW' or 'NHWC' [default: the axis of the model input that has 1 or 3 channels].
    channels: 'RGB' or 'L' [default: from the channel count]. dtype: NumPy dtype of the result.
    """

    path: str | os.PathLike
    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    channels: str | None = None
    scale: float = 1 / 255
    dtype: str = "float32"

    def load(self, model: onnx.ModelProto) -> CalibrationSet:
        from onnxflex.images import load_images

        return load_images(self, model)
