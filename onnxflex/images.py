"""Decode and preprocess a folder of images into calibration data (Pillow, the ``images`` extra)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnxflex.calib import CalibrationSet, check_calibration
from onnxflex.errors import CalibrationError
from onnxflex.graph import graph_input_names
from onnxflex.inputs import input_dims

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def load_images(spec, model: onnx.ModelProto) -> CalibrationSet:
    """Every image in ``spec.path`` (an ImageFolder), sorted by name, as one [N, ...] array for the
    model's single input, in the layout, size, channels and dtype the spec and the model ask for."""
    try:
        from PIL import Image
    except ModuleNotFoundError:
        raise CalibrationError("reading images needs Pillow: pip install 'onnxflex[images]'") from None
    folder = Path(spec.path)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise CalibrationError(f"image folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    name, dims = _image_input(model)
    layout = spec.layout or _layout(name, dims)
    if layout not in ("NCHW", "NHWC"):
        raise CalibrationError(f"image layout {layout!r} is not NCHW or NHWC")
    c_axis, h_axis = (1, 2) if layout == "NCHW" else (3, 1)
    size = spec.size or (dims[h_axis], dims[h_axis + 1])
    if not all(size):
        raise CalibrationError(f"input {name!r} has unknown height/width {dims}: give ImageFolder(size=(H, W))")
    mode = spec.channels or ("L" if dims[c_axis] == 1 else "RGB")
    samples = []
    for path in files:
        try:
            with Image.open(path) as image:
                samples.append(_preprocess(image.convert(mode), size, spec))
        except OSError as exc:
            raise CalibrationError(f"image {str(path)!r} cannot be read: {exc}") from None
    batch = np.stack(samples)
    if batch.ndim == 3:
        batch = batch[..., None]
    if layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return check_calibration({name: np.ascontiguousarray(batch.astype(spec.dtype))}, model, f"images in {str(folder)!r}")


def _image_input(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    names = graph_input_names(model)
    if len(names) != 1:
        raise CalibrationError(f"an image folder feeds single-input models only; this model has inputs {names}")
    vi = next(i for i in model.graph.input if i.name == names[0])
    dims = input_dims(vi)
    if len(dims) != 4:
        raise CalibrationError(f"input {names[0]!r} has rank {len(dims)}; images feed rank-4 inputs (NCHW or NHWC)")
    return names[0], dims


def _layout(name: str, dims: list[int | None]) -> str:
    if dims[1] in (1, 3):
        return "NCHW"
    if dims[3] in (1, 3):
        return "NHWC"
    raise CalibrationError(f"cannot tell the channel axis of input {name!r} {dims}: give ImageFolder(layout=...)")


def _preprocess(image, size: tuple[int, int], spec) -> np.ndarray:
    """Resize (shorter side to ``spec.resize`` then center-crop, or straight to ``size``), scale, normalise."""
    from PIL import Image

    height, width = size
    if spec.resize:
        ratio = spec.resize / min(image.size)
        image = image.resize((max(width, round(image.width * ratio)), max(height, round(image.height * ratio))),
                             Image.BILINEAR)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    else:
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) * spec.scale
    if spec.mean is not None:
        array = array - np.asarray(spec.mean, np.float32)
    if spec.std is not None:
        array = array / np.asarray(spec.std, np.float32)
    return array
