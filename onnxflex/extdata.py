"""Models whose weights live outside the protobuf (ONNX external data), handled without loading them.

A model loaded from a file that stores tensors as external data keeps the large ones on disk: the
ModelProto holds only their references (location, offset, length) and those files sit in a private
working folder (hard links to the input's files where the file system allows, copies otherwise). The
model records that folder in its metadata under ``WEIGHTS_DIR_KEY``; the key's presence also says
"save me with external data". Values are read with ``tensor_array``; onnxruntime and onnx.checker get
a file written by ``write_model`` so that no protobuf over 2 GB is serialised in memory; the input's
own files are only ever read.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor, uses_external_data

from onnxflex.errors import ModelLoadError

WEIGHTS_DIR_KEY = "onnxflex.weights_dir"
INLINE_BELOW_BYTES = 1 << 20  # external tensors smaller than this are read into the proto on load
EXTERNAL_MIN_BYTES = 1024  # tensors at least this large go to the data file when saving with external data
SINGLE_FILE_LIMIT = 1 << 30  # models with more in-memory tensor bytes than this are saved with external data
ALIGN = 4096  # data offsets on page boundaries, so that onnxruntime can map them
_CHUNK = 64 << 20
_FOLDERS: dict[str, tempfile.TemporaryDirectory] = {}


def load_offloaded(path: Path) -> onnx.ModelProto:
    """Load ``path``; tensors stored as external data of at least INLINE_BELOW_BYTES stay on disk."""
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in _tensors(model) if uses_external_data(t)]
    if not external:
        return model
    base = path.resolve().parent
    folder = None
    for tensor in external:
        info = ExternalDataInfo(tensor)
        source = _data_file(base, info.location, tensor.name, path)
        length = info.length or max(source.stat().st_size - (info.offset or 0), 0)
        if length < INLINE_BELOW_BYTES:
            load_external_data_for_tensor(tensor, str(base))
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
            continue
        if folder is None:
            folder = tempfile.TemporaryDirectory(prefix="onnxflex-weights-")
            _FOLDERS[folder.name] = folder
        target = Path(folder.name) / info.location
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)  # onnx refuses hard links and symbolic links to data files
    model.metadata_props.add(key=WEIGHTS_DIR_KEY, value=folder.name if folder else "")
    return model


def _data_file(base: Path, location: str, tensor: str, model_path: Path) -> Path:
    if os.path.isabs(location) or ".." in Path(location).parts:
        raise ModelLoadError(f"{str(model_path)!r}: tensor {tensor!r} names external data {location!r} outside "
                             "the model's folder; keep data files beside the model with relative names")
    source = base / location
    if not source.is_file():
        raise ModelLoadError(f"{str(model_path)!r}: the external data file {location!r} of tensor {tensor!r} "
                             f"is missing; copy it beside the model (expected at {str(source)!r})")
    return source


def _tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def weights_dir(model: onnx.ModelProto) -> str | None:
    """The working folder of an offloaded model ('' when all its tensors were read in), else None."""
    for prop in model.metadata_props:
        if prop.key == WEIGHTS_DIR_KEY:
            return prop.value
    return None


def is_offloaded(model: onnx.ModelProto) -> bool:
    """True when some tensor of ``model`` is a reference into its working folder."""
    return bool(weights_dir(model)) and any(uses_external_data(t) for t in model.graph.initializer)


def needs_file(model: onnx.ModelProto) -> bool:
    """True when onnxruntime and onnx.checker must get ``model`` as a file, not as bytes."""
    return is_offloaded(model) or _inline_bytes(model) > SINGLE_FILE_LIMIT


def _inline_bytes(model: onnx.ModelProto) -> int:
    return sum(payload_bytes(t) for t in model.graph.initializer if not uses_external_data(t))


SUB_BYTE_BITS = {TensorProto.UINT4: 4, TensorProto.INT4: 4, TensorProto.FLOAT4E2M1: 4,
                 getattr(TensorProto, "UINT2", -1): 2, getattr(TensorProto, "INT2", -1): 2}


def dims_bytes(tensor: TensorProto) -> int | None:
    """The bytes of a tensor's values as its dims and type give them (sub-byte types packed), wherever
    the values are (inline or external); None for a type without a fixed element size (strings)."""
    bits = SUB_BYTE_BITS.get(tensor.data_type)
    if bits is None:
        try:
            bits = 8 * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            return None
    return (int(np.prod(tensor.dims, dtype=np.int64)) * bits + 7) // 8


def payload_bytes(tensor: TensorProto) -> int:
    """About the bytes an inline initializer takes: of one in raw_data ``dims_bytes`` (protobuf's ByteSize
    serializes the message to count it: 8 ms for a 16 MB weight, and the passes ask for every initializer
    several times), else ByteSize."""
    size = dims_bytes(tensor) if tensor.HasField("raw_data") else None
    return tensor.ByteSize() if size is None else size


def tensor_array(tensor: TensorProto, model: onnx.ModelProto) -> np.ndarray:
    """The values of an initializer of ``model``, read from the working folder when it is external
    (the proto is not changed, so the weights do not stay in memory)."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    folder = weights_dir(model)
    if not folder:
        raise ModelLoadError(f"tensor {tensor.name!r} is stored as external data but the model was not loaded "
                             "from its file; pass the model's path instead of a ModelProto")
    direct = _read_external(tensor, folder)
    if direct is not None:
        return direct
    loaded = TensorProto()
    loaded.CopyFrom(tensor)
    load_external_data_for_tensor(loaded, folder)
    loaded.data_location = TensorProto.DEFAULT
    del loaded.external_data[:]
    return numpy_helper.to_array(loaded)


def _read_external(tensor: TensorProto, folder: str) -> np.ndarray | None:
    """The values of an external tensor of a plain numeric type read from its file straight into one
    array (the proto route holds the bytes twice: a layer of a large model costs three copies at
    once); None for the types numpy_helper has to unpack (4-bit, strings) or a payload of unexpected size."""
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    except (KeyError, TypeError, ValueError):  # an undefined or unknown element type
        return None
    if dtype.kind not in "biuf":  # strings, complex and the packed ml_dtypes types numpy_helper unpacks
        return None
    info = ExternalDataInfo(tensor)
    if os.path.isabs(info.location) or ".." in Path(info.location).parts:
        return None  # onnx's own loader checks (and refuses) locations outside the model's folder
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if info.length and info.length != count * dtype.itemsize:
        return None
    with open(os.path.join(folder, info.location), "rb") as f:
        f.seek(info.offset or 0)
        values = np.fromfile(f, dtype=dtype, count=count)
    if values.size != count:
        raise ModelLoadError(f"external data of tensor {tensor.name!r} in {info.location!r} is shorter than its "
                             f"{count} values")
    return values.reshape(tuple(tensor.dims))


def write_model(model: onnx.ModelProto, path: str | os.PathLike, location: str | None = None,
                data_path: str | os.PathLike | None = None) -> Path:
    """Write ``model`` to ``path`` with every tensor of EXTERNAL_MIN_BYTES or more in the data file that
    ``location`` names (relative to ``path``'s folder; default ``<file name>.data``), written at
    ``data_path`` (default: where ``location`` points; a temporary name lets the caller rename it).
    Payloads are copied tensor by tensor; ``model`` is not changed and no serialisation of the weights
    is held in memory. When ``path`` lies in the model's own working folder, tensors already there are
    referenced instead of copied."""
    path = Path(path)
    location = location or f"{path.name}.data"
    data_path = Path(data_path) if data_path is not None else path.parent / location
    folder = weights_dir(model) or ""
    reuse = bool(folder) and path.resolve().parent == Path(folder).resolve()
    skeleton = onnx.ModelProto()
    copy_except(skeleton, model, {"graph", "metadata_props"})
    skeleton.metadata_props.extend(p for p in model.metadata_props if reuse or p.key != WEIGHTS_DIR_KEY)
    copy_except(skeleton.graph, model.graph, {"initializer"})
    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            skeleton.graph.initializer.append(_externalized(tensor, folder, reuse, data, location))
    with open(path, "wb") as f:
        f.write(skeleton.SerializeToString())
    return path


def offload(model: onnx.ModelProto) -> onnx.ModelProto:
    """For a model with a working folder: the same model with its large in-memory tensors written into
    that folder and referenced from there (a new, small ModelProto); other models are returned as is."""
    folder = weights_dir(model)
    if not folder:
        return model
    fd, name = tempfile.mkstemp(prefix="offloaded-", suffix=".onnx", dir=folder)
    os.close(fd)
    write_model(model, name)
    out = onnx.load(name, load_external_data=False)
    os.unlink(name)  # its data file stays: ``out`` refers to it
    return out


def _externalized(tensor: TensorProto, folder: str, reuse: bool, data, location: str) -> TensorProto:
    if uses_external_data(tensor) and reuse:
        return tensor
    big = uses_external_data(tensor) or (tensor.HasField("raw_data") and payload_bytes(tensor) >= EXTERNAL_MIN_BYTES)
    if not big:
        return tensor
    out = TensorProto()
    copy_except(out, tensor, {"raw_data", "external_data", "data_location"})
    offset = data.tell()
    if offset % ALIGN:
        data.write(b"\0" * (ALIGN - offset % ALIGN))
        offset = data.tell()
    if uses_external_data(tensor):
        for chunk in external_chunks(tensor, folder):
            data.write(chunk)
    else:
        data.write(tensor.raw_data)
    length = data.tell() - offset
    out.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        out.external_data.add(key=key, value=value)
    return out


def external_chunks(tensor: TensorProto, folder: str | os.PathLike) -> Iterator[bytes]:
    """The bytes of an external ``tensor`` (its location is relative to ``folder``), in chunks of at
    most 64 MiB, so that a large tensor is never held whole."""
    info = ExternalDataInfo(tensor)
    with open(Path(folder) / info.location, "rb") as src:
        src.seek(info.offset or 0)
        remaining = info.length if info.length else None
        while remaining is None or remaining > 0:
            chunk = src.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not chunk:
                break
            yield chunk
            if remaining is not None:
                remaining -= len(chunk)


def copy_except(dst, src, skip: set[str]) -> None:
    """Copies every set field of protobuf message ``src`` into ``dst`` except those named in ``skip``, which
    are never read (ListFields would make a bytes object of a tensor's whole raw_data, only to skip it)."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name in skip:
            continue
        if _repeated(fd):
            value = getattr(src, fd.name)
            if len(value):
                getattr(dst, fd.name).extend(value)
        elif src.HasField(fd.name):
            if fd.message_type is not None:
                getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
            else:
                setattr(dst, fd.name, getattr(src, fd.name))


def _repeated(field) -> bool:
    """Whether protobuf FieldDescriptor ``field`` is repeated (protobuf 7 dropped ``label`` for ``is_repeated``)."""
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


ASIDE_BYTES = 1 << 16  # initializers at least this large go to onnx's converter and inference without their payload


def without_payloads(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """(a new model: ``model`` with its large top-level initializers as stubs, their name, type and
    dims only; those initializers by name), for onnx's version converter and shape inference, which
    read no weight's values: the converter copies the whole model four times (to bytes, into its graph,
    back to bytes and to a proto), inference twice, and for a decoder's packed weights or a recogniser's
    8,210-class head that is several times their size (and 0.5 of 0.9 s of the recogniser's passes).
    ``model`` is not changed."""
    light, held = onnx.ModelProto(), {}
    copy_except(light, model, {"graph"})
    copy_except(light.graph, model.graph, {"initializer"})
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and payload_bytes(tensor) >= ASIDE_BYTES:
            held[tensor.name] = tensor
            copy_except(light.graph.initializer.add(), tensor, {"raw_data"})
        else:
            light.graph.initializer.append(tensor)
    return light, held


def with_payloads(model: onnx.ModelProto, held: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """Mutates and returns ``model`` (made from ``without_payloads``' light model) with the payloads it
    left out back in place."""
    for t in model.graph.initializer:
        if t.name in held and not t.raw_data and not t.external_data:
            t.CopyFrom(held[t.name])  # one copy in C (reading raw_data made a bytes object, then another)
    return model


__all__ = ["WEIGHTS_DIR_KEY", "copy_except", "dims_bytes", "is_offloaded", "load_offloaded", "needs_file",
           "payload_bytes", "tensor_array", "weights_dir", "with_payloads", "without_payloads", "write_model"]
