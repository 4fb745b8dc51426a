"""canonicalize: one predictable graph shape for every later pass.

Upgrades opsets below 13 (per-channel DequantizeLinear needs 13) with onnx's version converter, names every node uniquely, pins the
inputs --fix-input names (passes/pin_inputs.py), turns Constant nodes into initializers, drops
Identity/Dropout and single-input Concat, lowers the ops onnxruntime writes in the default domain
that ONNX lacks (passes/ort_default_ops.py), folds nodes whose inputs are all constant (weights fed through Transpose/Cast/Reshape
become plain initializers), folds the known dims of shapes, inlines the branch an If with a constant
condition takes (passes/fold_if.py), gives subgraph initializers names of their own and routes outer
tensors into subgraphs through Identities (passes/control_flow.py), gives each weighted node its own
copy of a shared weight or bias, sorts topologically and infers shapes. Graph input/output dims written
as dim_value <= 0 (a dynamic batch in legacy exports) become unknown.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper, shape_inference, version_converter
from onnx.reference import ReferenceEvaluator

from onnxflex.errors import UnsupportedModelError
from onnxflex.extdata import tensor_array, with_payloads, without_payloads
from onnxflex.graph import (DEFAULT_DOMAINS, MIN_OPSET, NameScope, default_opset, drop_unused_initializers,
                            name_nodes_uniquely)
from onnxflex.inputs import known_dim
from onnxflex.ort import clear_unknown_dims
from onnxflex.passes.context import PassContext
from onnxflex.passes.control_flow import (explicit_outer_reads, localize_outer_initializers,
                                           local_layer_inputs, subgraph_reads, subgraphs,
                                           unique_subgraph_initializers)
from onnxflex.passes.fold_if import fold_constant_ifs
from onnxflex.passes.ort_default_ops import lower_ort_default_ops
from onnxflex.passes.pin_inputs import pin_inputs, pinned_values, restore_declarations

QDQ_MIN_OPSET = 13
NOT_FOLDED = {"QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform", "RandomNormalLike",
              "RandomUniformLike", "Multinomial", "If", "Loop", "Scan", "Bernoulli"}
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
FOLD_LIMIT_BYTES = 256 << 20


def canonicalize(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Returns the canonical model. May mutate ``model`` on the way: when no opset upgrade copies it,
    node names, initializer graph inputs, Constant and Identity/Dropout nodes are rewritten in place
    (and constants folded too if shape inference fails); pass a copy to keep the original."""
    # a batch written as -1 or 0: the emitted model must load in onnxruntime; cleared before the opset
    # upgrade, whose shape inference would otherwise spread -1 and 0 into the value_info it writes
    # (onnxruntime then refuses a Reshape to [0, 0, -1] of a tensor declared [0, -1, 2, 32])
    clear_unknown_dims(model)
    model = _upgrade_opset(model, ctx)
    name_nodes_uniquely(model)
    pinned = pinned_values(model, ctx.config.fix_inputs)
    declared = [_copy(vi) for vi in model.graph.input if vi.name in pinned]
    pin_inputs(model, ctx)
    _drop_initializer_inputs(model)
    _constants_to_initializers(model)
    _remove_identities(model)
    model = _infer(model)
    if lower_ort_default_ops(model):
        model = _infer(model)
    _fold_constants(model)
    while fold_constant_ifs(model):  # a folded branch may hold constants and Ifs that fold in turn
        _constants_to_initializers(model)
        model = _infer(model)  # the inlined nodes' shapes, for the Shape dims they check
        _fold_constants(model)
    unique_subgraph_initializers(model)
    explicit_outer_reads(model, NameScope.of(model))
    local_layer_inputs(model, NameScope.of(model), tuple(WEIGHTED_OPS))
    _untie_shared_weights(model)
    model = _cleanup_and_sort(model)
    restore_declarations(model, declared, pinned)
    return _infer(model)


def _copy(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    return out


def _upgrade_opset(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Models below opset 13 (opset 9 model-zoo CNNs, opset 11 exports) go through onnx's version
    converter, with a warning; a model it cannot convert is refused in one line."""
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"model opset {opset} is below {MIN_OPSET}, the oldest onnx's version converter upgrades; re-export "
            f"it with opset >= {QDQ_MIN_OPSET}")
    if opset > newest:
        raise UnsupportedModelError(
            f"model opset {opset} is newer than the installed onnx knows ({newest}); upgrade the onnx package")
    if opset >= QDQ_MIN_OPSET:
        return model
    try:
        light, held = without_payloads(model)
        upgraded = with_payloads(version_converter.convert_version(light, QDQ_MIN_OPSET), held)
    except Exception as exc:
        reason = " ".join(str(exc).split()).rpartition(" failed: ")[2] or type(exc).__name__
        raise UnsupportedModelError(
            f"model opset {opset} must be upgraded to {QDQ_MIN_OPSET} for per-channel DequantizeLinear, and "
            f"onnx's version converter failed: {reason}; re-export the model with opset >= {QDQ_MIN_OPSET}") from exc
    ctx.warnings.append(f"upgraded the model from opset {opset} to {QDQ_MIN_OPSET} with onnx's version converter "
                        "(per-channel Q/DQ needs 13)")
    return upgraded


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Mutates: initializers listed as graph inputs (old IR style) are treated as constants."""
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Mutates: Constant nodes of the top-level graph and of every subgraph become initializers of
    their own graph (a frozen torch module exports the weights in its If branches as Constants)."""
    _graph_constants_to_initializers(model.graph)


def _graph_constants_to_initializers(g: onnx.GraphProto) -> None:
    for node in g.node:
        for _, sub in subgraphs(node):
            _graph_constants_to_initializers(sub)
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.attribute) == 1:
            value = _constant_value(node)
            if value is not None:
                g.initializer.append(numpy_helper.from_array(value, node.output[0]))
                continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)


# tensor types whose Constant value numpy_helper reads as the reference evaluator does
PLAIN_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32,
               TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
               TensorProto.BOOL}


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """A Constant's value: a ``value`` tensor of a plain type read directly (a model holds hundreds: one
    reference evaluator each cost the silero VAD a third of a second), others by the reference evaluator."""
    attr = node.attribute[0]
    if attr.name in ("sparse_value",):
        return None
    if attr.name == "value" and attr.t.data_type in PLAIN_TYPES and attr.t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(attr.t)
    return ReferenceEvaluator(node).run(None, {})[0]


def _remove_identities(model: onnx.ModelProto) -> None:
    """Mutates: Identity, inference-mode Dropout and single-input Concat nodes are bypassed and removed
    (decoder exports concatenate an empty cache with a lone past key, and the past length their masks
    take from its Shape must stay the Shape of a graph input: passes/partition.side_tensors)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    implicit = {name for n in g.node for name in subgraph_reads(n)}  # renaming would break subgraphs
    for node in [n for n in g.node if n.op_type in ("Identity", "Dropout") or _lone_concat(n)]:
        if node.op_type == "Dropout" and (len(node.output) > 1 and node.output[1]):
            continue  # the mask is consumed; leave it to the converter
        src, dst = node.input[0], node.output[0]
        if src in implicit or dst in implicit:
            continue
        if dst in outputs:
            if src in outputs or src in {i.name for i in g.input} or src in {t.name for t in g.initializer}:
                continue
            _rename_tensor(g, src, dst)
        else:
            _rename_tensor(g, dst, src)
        g.node.remove(node)


def _lone_concat(node: onnx.NodeProto) -> bool:
    return node.op_type == "Concat" and len(node.input) == 1


def _rename_tensor(g: onnx.GraphProto, old: str, new: str) -> None:
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    light, held = without_payloads(model)  # its large weights' values are not read
    try:
        return with_payloads(shape_inference.infer_shapes(light, data_prop=True), held)
    except Exception:  # inference is a convenience; a model it cannot handle still quantizes
        return model


def _fold_constants(model: onnx.ModelProto) -> None:
    """Mutates: evaluates nodes whose inputs are all constant once, and the dims of a shape that are
    known: a Shape of a static shape, and a Gather of the known dims of a Shape (``state.shape[0]`` of
    a state declared ``[2, ?, 128]``, an If condition that a streaming export checks)."""
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    declared = _declared_shapes(model)
    shapes: dict[str, list[int | None]] = {}  # a kept Shape's output → the dims it holds
    keep = []
    for node in g.node:
        values = _try_fold(node, consts, declared, shapes, lambda t: tensor_array(t, model))
        if values is None:
            keep.append(node)
            if node.op_type == "Shape" and node.domain in DEFAULT_DOMAINS and node.input[0] in declared:
                shapes[node.output[0]] = _shape_slice(node, declared[node.input[0]])
            continue
        for name, value in zip(node.output, values):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            g.initializer.append(tensor)
            consts[name] = tensor
    del g.node[:]
    g.node.extend(keep)
    localize_outer_initializers(model)
    drop_unused_initializers(model)


def _try_fold(node, consts, declared, shapes, read=numpy_helper.to_array) -> list[np.ndarray] | None:
    """The outputs of ``node`` when they are known before any run; ``declared`` maps a tensor to its
    declared dims (None where unknown), ``shapes`` a kept Shape's output to the dims it holds."""
    if node.op_type in NOT_FOLDED or node.domain not in DEFAULT_DOMAINS:
        return None
    if node.op_type == "Shape" and node.input[0] in declared:
        dims = _shape_slice(node, declared[node.input[0]])
        return [np.array(dims, dtype=np.int64)] if None not in dims else None
    if node.op_type == "Gather" and node.input[0] in shapes and node.input[1] in consts:
        return _gather_known_dims(node, shapes[node.input[0]], read(consts[node.input[1]]))
    names = [i for i in node.input if i]
    if not names or not all(i in consts for i in names):
        return None
    feeds = {i: read(consts[i]) for i in names}
    if sum(v.nbytes for v in feeds.values()) > FOLD_LIMIT_BYTES:
        return None
    try:
        return list(ReferenceEvaluator(node).run(None, feeds))
    except Exception:
        return None


def _shape_slice(node: onnx.NodeProto, dims: list[int | None]) -> list[int | None]:
    attrs = {a.name: a.i for a in node.attribute}
    return list(dims)[attrs.get("start", 0):attrs.get("end", len(dims))]


def _gather_known_dims(node: onnx.NodeProto, dims: list[int | None], indices: np.ndarray) -> list[np.ndarray] | None:
    """A Gather of a Shape's output at constant indices, when every gathered dim is known."""
    if any(a.name == "axis" and a.i != 0 for a in node.attribute) or not np.issubdtype(indices.dtype, np.integer):
        return None
    rank = len(dims)
    picked = [dims[int(i)] if -rank <= int(i) < rank else None for i in indices.reshape(-1)]
    return [np.array(picked, dtype=np.int64).reshape(indices.shape)] if picked and None not in picked else None


def _declared_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Each tensor with a declared rank: its dims, None where unknown (see inputs.known_dim)."""
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [known_dim(d) for d in t.shape.dim]
    return shapes


def _untie_shared_weights(model: onnx.ModelProto) -> None:
    """Mutates: a weight or bias initializer read by several weighted nodes, or by a weighted node and
    another node, gets one copy per weighted node (each layer quantizes it with its own scales: a
    shared int32 bias would carry one layer's input step × weight step into the other)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    scope = NameScope.of(model)
    seen: set[str] = set()
    for node in g.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        for slot in (1, 2):
            name = node.input[slot] if len(node.input) > slot else ""
            if name not in inits:
                continue
            if name in seen or _read_elsewhere(g, name, node):
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = scope.unique_name(f"{name}_{node.name}")
                g.initializer.append(copy)
                node.input[slot] = copy.name
            seen.add(node.input[slot])


def _read_elsewhere(g: onnx.GraphProto, name: str, node: onnx.NodeProto) -> bool:
    return any(name in n.input for n in g.node if n is not node and n.op_type not in WEIGHTED_OPS)


def _cleanup_and_sort(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out
