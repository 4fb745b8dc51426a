"""Model I/O and small graph queries shared by passes, capture and the emitter."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxflex.errors import ModelLoadError
from onnxflex.extdata import load_offloaded, needs_file, weights_dir, write_model

DEFAULT_DOMAINS = ("", "ai.onnx")  # the ONNX operator set, by both of its names
MIN_OPSET = 1  # onnx's version converter has adapters from opset 1; canonicalize upgrades to 13
SMALL_INIT = 4096  # initializers up to this many elements stay in the shape model (shape constants)
INTEGER_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                           onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                           onnx.TensorProto.UINT32, onnx.TensorProto.UINT64})

log = logging.getLogger("onnxflex")


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load a model from a path (external data resolved beside it) or return a copy of a ModelProto."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist or is not a file")
    try:
        model = load_offloaded(path)  # large external tensors stay on disk (onnxflex.extdata)
    except ModelLoadError:
        raise
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelLoadError(f"{str(path)!r} is not a readable ONNX model: {exc}; the file is truncated or "
                             "not ONNX: export or copy it again") from exc
    if not model.graph.node:
        raise ModelLoadError(f"{str(path)!r} has no graph nodes; is it an ONNX model?")
    if not model.opset_import:  # a cut that happens to end between two fields still parses
        raise ModelLoadError(f"{str(path)!r} imports no opset; the file is truncated or not ONNX: "
                             "export or copy it again")
    return model


def _write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``; on any
    failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file for other users
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` so that no half-written model is ever left there. A model loaded from
    external data, or too large for one protobuf, is written with its tensors in ``<path>.data``: a
    file of its own, never the input's."""
    if weights_dir(model) is None and not needs_file(model):
        return _write_atomic(path, lambda tmp: onnx.save(model, tmp))
    path = Path(path)
    location = f"{path.name}.data"
    data = path.parent / location
    return _write_atomic(path, lambda tmp: _write_atomic(data, lambda tmp_data: write_model(
        model, tmp, location=location, data_path=tmp_data)))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return _write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def copy_file_atomic(origin: str | os.PathLike, path: str | os.PathLike) -> Path:
    return _write_atomic(path, lambda tmp: shutil.copyfile(origin, tmp))


def node_attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The decoded value of ``node``'s attribute ``name``, or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return imp.version
    raise ModelLoadError("model imports no default-domain opset; it is not a standard ONNX model")


def set_default_opset(model: onnx.ModelProto, version: int) -> None:
    """Mutates ``model``: sets the default-domain opset import to ``version``."""
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            imp.version = version
            return
    model.opset_import.add(domain="", version=version)


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that are fed at run time (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def name_nodes_uniquely(model: onnx.ModelProto) -> None:
    """Mutates: empty or repeated node names become unique names derived from the op type, across the
    top-level graph (named first) and every subgraph (quantizers and control-flow runs key on them)."""
    nodes = list(model.graph.node)
    nodes += [m for n in model.graph.node for a in n.attribute
              for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs) for m in all_nodes(sub)]
    scope = NameScope(n.name for n in nodes if n.name)
    seen: set[str] = set()
    for node in nodes:
        if not node.name or node.name in seen:
            node.name = scope.unique_name(node.op_type)
        seen.add(node.name)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Mutates: removes initializers no node reads and no graph output names; one that is also a graph
    input (the default value of an input, as a pinned input has) stays."""
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output} | {i.name for i in g.input}
    for index in reversed([i for i, t in enumerate(g.initializer) if t.name not in used]):
        del g.initializer[index]  # in place: re-adding the kept ones would copy every payload


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                out.setdefault(name, []).append(node)
    return out


def static_shapes(model: onnx.ModelProto, feeds: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], int]]:
    """Tensor → (shape, element type), for the tensors that onnx's shape inference gives a fully known
    shape when the graph inputs take the shapes of ``feeds`` (arrays; inputs not in it are left out);
    {} when inference fails. It runs on a model of the nodes, those inputs and the small initializers
    (shape constants): bigger weights become typed inputs, so their data is never read or copied."""
    typed = [helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, np.shape(feeds[vi.name]))
             for vi in model.graph.input if vi.name in feeds]
    return _inferred_shapes(model, model.graph.node, typed, [], model.graph.output, set())


def block_shapes(model: onnx.ModelProto, nodes: Iterable[str], feeds: dict[str, np.ndarray]
                 ) -> dict[str, tuple[tuple[int, ...], int]]:
    """static_shapes of the top-level nodes named ``nodes`` alone (a block), their outside inputs given
    by ``feeds`` (captured arrays in the model's layout): it knows what whole-model inference cannot,
    a Reshape to a shape computed from data upstream, or from Shape through ops onnx's inference does
    not propagate values through (Mul before opset 14). An integer feed of at most SMALL_INIT values
    goes in as a constant (its value), and so do the values ``shape_values`` computes."""
    wanted = set(nodes)
    picked = [n for n in model.graph.node if n.name in wanted]
    typed, constants = [], []
    for name, value in feeds.items():
        array = np.asarray(value)
        if array.dtype.kind in "iu" and array.size <= SMALL_INIT:
            constants.append(numpy_helper.from_array(array, name))
        else:
            elem = helper.np_dtype_to_tensor_dtype(array.dtype)
            typed.append(helper.make_tensor_value_info(name, elem, array.shape))
    constants += shape_values(model, picked, feeds)
    given = {vi.name for vi in typed} | {t.name for t in constants}
    return _inferred_shapes(model, picked, typed, constants, [], given)


def shape_values(model: onnx.ModelProto, nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray]
                 ) -> list[onnx.TensorProto]:
    """The small integer tensors that ``nodes`` (in order) compute from shapes and integer constants
    alone: a Shape of a feed, and a node whose inputs are all such values, integer feeds or integer
    initializers (of at most SMALL_INIT values), evaluated with onnx.reference; [] when it fails."""
    from onnx.reference import ReferenceEvaluator

    small = {i.name: i for i in model.graph.initializer
             if int(np.prod(i.dims)) <= SMALL_INIT and i.data_type in INTEGER_TYPES}
    known = set(small) | {k for k, v in feeds.items() if np.asarray(v).dtype.kind in "iu"}
    steps = []
    for node in nodes:
        inputs = [i for i in node.input if i]
        shape_of_feed = node.op_type == "Shape" and inputs and inputs[0] in feeds
        if node.domain in DEFAULT_DOMAINS and not _has_subgraph(node) and (
                shape_of_feed or (inputs and all(i in known for i in inputs))):
            steps.append(node)
            known.update(node.output)
    if not steps:
        return []
    produced = [o for n in steps for o in n.output]
    graph = helper.make_graph(steps, "shape_values", [], [helper.make_tensor_value_info(o, 0, None) for o in produced],
                              [small[i] for i in small if any(i in n.input for n in steps)])
    read = {i for n in steps for i in n.input} - set(produced) - set(small)
    graph.input.extend(helper.make_tensor_value_info(i, 0, None) for i in read)
    try:
        values = ReferenceEvaluator(helper.make_model(graph, opset_imports=model.opset_import)).run(
            None, {i: np.asarray(feeds[i]) for i in read})
    except Exception as exc:  # only estimates hang on these values
        log.debug("shape values failed: %s", exc)
        return []
    return [numpy_helper.from_array(np.asarray(v), name) for name, v in zip(produced, values)
            if np.asarray(v).dtype.kind in "iu" and np.asarray(v).size <= SMALL_INIT]


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _inferred_shapes(model: onnx.ModelProto, nodes, typed: list, constants: list, outputs, given: set[str]
                     ) -> dict[str, tuple[tuple[int, ...], int]]:
    """Shape inference (static_shapes) on ``nodes`` with the graph inputs ``typed`` (ValueInfoProtos),
    the initializers ``constants`` and the model's small initializers not named in ``given`` (the
    bigger ones typed inputs)."""
    from onnx import shape_inference

    graph = onnx.GraphProto()
    graph.node.extend(nodes)
    graph.output.extend(outputs)
    graph.input.extend(typed)
    graph.initializer.extend(constants)
    for init in model.graph.initializer:
        if init.name in given:
            continue
        if int(np.prod(init.dims)) <= SMALL_INIT and init.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(init)
        else:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    shaped = helper.make_model(graph, opset_imports=model.opset_import)
    shaped.ir_version = model.ir_version
    try:
        inferred = shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception as exc:  # onnx raises several types; shapes only feed estimates, never stop a run
        log.debug("shape inference failed: %s", exc)
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue  # no shape at all is an unknown rank, not a scalar
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = (tuple(int(d.dim_value) for d in dims), vi.type.tensor_type.elem_type)
    return out


class NameScope:
    """Hands out tensor/node names that do not collide with any name already in a graph."""

    def __init__(self, taken: Iterable[str]) -> None:
        self._taken = set(taken)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "NameScope":
        """Every node and tensor name of the model, subgraphs (If branches, Loop/Scan bodies) included:
        a name new in one scope then collides with none in another."""
        return cls(scope_names(model.graph))

    def unique_name(self, base: str) -> str:
        name, k = base, 1
        while name in self._taken:
            name = f"{base}_{k}"
            k += 1
        self._taken.add(name)
        return name


def scope_names(g: onnx.GraphProto, skip: onnx.GraphProto | None = None) -> set[str]:
    """Node and tensor names of ``g`` and every graph nested in it, except the graph ``skip``."""
    names = {n.name for n in g.node} | {t.name for t in g.initializer}
    names |= {o for n in g.node for o in n.output} | {i.name for i in g.input} | {o.name for o in g.output}
    names |= {v.name for v in g.value_info}
    for node in g.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                if sub is not skip:
                    names |= scope_names(sub, skip)
    return names


def all_nodes(g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of ``g`` and of every graph nested in them (If branches, Loop/Scan bodies), in order."""
    nodes = []
    for node in g.node:
        nodes.append(node)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                nodes += all_nodes(sub)
    return nodes


def check_output_path(model: str | os.PathLike, output: str | os.PathLike) -> None:
    """Before any work: raises OutputError when ``output`` is the model itself or its ``.data`` file, or
    when its folder cannot be written (probed by creating and removing a file there)."""
    from onnxflex.errors import OutputError

    model, output = Path(model).resolve(), Path(output).resolve()
    inputs = {model, model.with_name(model.name + ".data")}
    if output in inputs or output.with_name(output.name + ".data") in inputs:
        raise OutputError(f"-o {str(output)!r} would overwrite the input model {str(model)!r} or its weights; "
                          "pass another -o path")
    if output.is_dir():
        raise OutputError(f"-o {str(output)!r} is a folder; pass a file path such as {str(output / 'model.q.onnx')!r}")
    folder = output.parent
    while not folder.exists():
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise OSError(f"{str(folder)!r} is a file, not a folder")
        fd, probe = tempfile.mkstemp(prefix=".onnxflex-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write -o {str(output)!r}: {exc}; pass an -o path in a writable folder") from None
