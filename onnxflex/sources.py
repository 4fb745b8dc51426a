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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxflex.calib import (NP_TYPES, CalibrationSet, check_calibration, default_calibration_path, input_dims,
                            load_npz, read_npz, show_dims)
from onnxflex.config import QuantConfig, parse_input_shape
from onnxflex.errors import CalibrationError
from onnxflex.graph import consumers, graph_input_names
from onnxflex.images import IMAGE_SUFFIXES

log = logging.getLogger("onnxflex")


def resolve_calibration(calibration: Any, model: onnx.ModelProto, model_source: Any,
                        config: QuantConfig) -> CalibrationSet:
    """Any accepted source (see the module docstring) → a CalibrationSet checked against ``model``."""
    if calibration is None:
        found = default_calibration_path(model_source) if isinstance(model_source, (str, os.PathLike)) else None
        if found is None:
            return synthetic_calibration(model, config)
        calibration = found
    if isinstance(calibration, CalibrationSet):
        return check_calibration(calibration.arrays, model, calibration.source)
    if isinstance(calibration, ImageFolder):
        return calibration.load(model)
    if isinstance(calibration, (str, os.PathLike)):
        return _from_path(Path(calibration), model)
    if isinstance(calibration, Mapping):
        return check_calibration({k: np.asarray(v) for k, v in calibration.items()}, model, "calibration mapping")
    if callable(getattr(calibration, "get_next", None)):
        return from_feeds(iter(calibration.get_next, None), model, f"{type(calibration).__name__}.get_next()")
    if isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        return from_feeds(iter(calibration), model, f"{type(calibration).__name__} of feed dicts")
    raise CalibrationError(
        f"unsupported calibration source of type {type(calibration).__name__}; pass an .npz path, a folder, "
        "an ImageFolder, a mapping of input name to array, a CalibrationDataReader or an iterable of feed dicts")


def _from_path(path: Path, model: onnx.ModelProto) -> CalibrationSet:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
            return ImageFolder(path).load(model)
        arrays = [p for p in files if p.suffix in (".npy", ".npz")]
        if not arrays:
            raise CalibrationError(f"calibration folder {str(path)!r} holds no .npy, .npz or image files")
        return from_feeds((_feed_of_file(p, model) for p in arrays), model, f"folder {str(path)!r}")
    if path.suffix == ".npy":
        return from_feeds(iter([_feed_of_file(path, model)]), model, str(path))
    return load_npz(path, model)


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


def from_feeds(feeds: Iterable[Any], model: onnx.ModelProto, source: str) -> CalibrationSet:
    """Stack feed dicts ({input name: array}, each with or without a batch dimension) on dim 0."""
    inputs = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in model.graph.input
              if vi.name in set(graph_input_names(model))}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
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
            array = np.asarray(value)
            parts[name].append(array[None] if array.ndim == inputs[name] - 1 else array)
    if count == 0:
        raise CalibrationError(f"{source}: the calibration source is empty: it yielded no feed dicts, expected "
                               f"dicts with {', '.join(map(repr, inputs))}")
    missing = [name for name, got in parts.items() if len(got) < count]
    if missing:
        raise CalibrationError(f"{source}: input {missing[0]!r} is missing from {count - len(parts[missing[0]])} "
                               f"of {count} feeds; every feed needs every model input")
    try:
        arrays = {name: np.concatenate(got) for name, got in parts.items()}
    except ValueError as exc:
        shapes = {name: sorted({a.shape for a in got}) for name, got in parts.items()}
        raise CalibrationError(f"{source}: feeds have different shapes {shapes}: {exc}") from None
    return check_calibration(arrays, model, source)


def synthetic_calibration(model: onnx.ModelProto, config: QuantConfig) -> CalibrationSet:
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
    arrays = {}
    for vi in model.graph.input:
        if vi.name in names:
            dims = _sample_dims(vi, shapes.get(vi.name))
            arrays[vi.name] = _random_input(model, vi, [n, *dims], rng)
    log.warning("no calibration data given: quantizing on %d synthetic samples drawn from the input signature; "
                "accuracy will suffer — pass --calib with real inputs", n)
    return check_calibration(arrays, model, "synthetic data")


def _sample_dims(vi: onnx.ValueInfoProto, given: tuple[int, ...] | None) -> list[int]:
    dims = input_dims(vi)
    if given is not None:
        if len(given) != len(dims) or any(d is not None and d != g for d, g in zip(dims[1:], given[1:])):
            raise CalibrationError(f"--input-shape {vi.name}:{'x'.join(map(str, given))} does not fit the model's "
                                   f"input {vi.name!r} of shape {show_dims(dims)}")
        return list(given[1:])
    if any(d is None or d == 0 for d in dims[1:]):
        example = "x".join(str(d) if d else "N" for d in [1, *dims[1:]])
        raise CalibrationError(f"no calibration data and input {vi.name!r} has unknown dimensions {show_dims(dims)}: "
                               f"pass --calib, or --input-shape {vi.name}:{example} with N filled in")
    return dims[1:]


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
