"""select: which weighted nodes get quantized weights and which tensors get activation Q/DQ.

These are planning functions, not graph passes (no ``Pass``, nothing rewritten): they read the
canonical model and return the QuantLayers and activation points that passes/partition.py groups into
a BlockPlan. The placement facts they rely on (float types, weight axes, residual skips) live in
onnxflex/placement.py, shared with the check rules (runtimes/rules.py).
"""
from __future__ import annotations

import onnx

from onnxflex.blocks import QuantLayer
from onnxflex.errors import ConfigError, UnsupportedModelError
from onnxflex.graph import consumers, graph_input_names, node_attr
from onnxflex.options import PlanOptions
from onnxflex.passes.kv_cache import cache_sources
from onnxflex.placement import (FLOAT_TYPES, LATER_LAYER_OPS, QUANTIZABLE_TYPES, channel_axis, declared_types,
                                final_tensors, head_nodes, output_point, reduction_depth, residual_skips)
from onnxflex.runtimes.base import Target


def select_layers(model: onnx.ModelProto, target: Target, config: PlanOptions) -> tuple[QuantLayer, ...]:
    """The weighted nodes with a constant weight that the config does not exclude, in graph order. A
    head (placement.head_nodes) gets ``head_bits`` unless a layer_bits pattern names it; at 0 it stays
    float."""
    inits = {t.name: t for t in model.graph.initializer}
    heads = head_nodes(model.graph)
    layers = []
    for node in model.graph.node:
        if node.op_type not in target.weighted_ops or config.keeps_float(node.name, node.op_type):
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if weight.data_type not in FLOAT_TYPES:
            continue
        check_float32(node, weight)
        axis = channel_axis(node, len(weight.dims))
        if axis is None:
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        bits = config.bits_for(node.name, head=node.name in heads)
        if not bits:
            continue
        group = _group_size(node, weight, bits, config, target, head=node.name in heads)
        layers.append(QuantLayer(node.name, node.op_type, weight.name, axis, node.input[0], bias, bits, group))
    return tuple(layers)


def latency_floats(model: onnx.ModelProto, layers: tuple[QuantLayer, ...], target: Target,
                   config: PlanOptions) -> tuple[tuple[QuantLayer, int], ...]:
    """(layer, reduction depth) of the ``layers`` the latency rule keeps float, in graph order: those of
    depth below ``target.float_depth`` (placement.reduction_depth), except a layer whose output point
    (placement.output_point) is read only by layers that stay integer, as their input — floating it
    would keep its output Q/DQ and add a float op. A layer kept by that exception makes its own
    producers' readers integer, so the exception is applied until nothing changes (deterministic: no
    timing). Empty when the rule is off (``config.latency_rules``, a target without ``float_depth``)
    or for weight-only runs, which put no Q/DQ on activations."""
    if not config.latency_rules or not target.float_depth or config.abits == 0:
        return ()
    dims = {t.name: t.dims for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    depth = {l.node: reduction_depth(by_name[l.node], dims[l.weight]) for l in layers}
    floated = {name for name, d in depth.items() if d < target.float_depth}
    users, outputs = consumers(model), {o.name for o in model.graph.output}
    points = {name: output_point(by_name[name].output[0], users, target.absorb, outputs) for name in floated}
    names = {l.node for l in layers}
    while True:
        integer = names - floated
        kept = {name for name in floated if points[name] not in outputs and users.get(points[name])
                and all(r.name in integer and r.input[0] == points[name] for r in users[points[name]])}
        if not kept:
            return tuple((l, depth[l.node]) for l in layers if l.node in floated)
        floated -= kept


def check_float32(node: onnx.NodeProto, weight: onnx.TensorProto) -> None:
    """Refuses a weighted node whose float weight is not float32 (the torch side computes in float32)."""
    if weight.data_type != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError(
            f"node {node.name!r} ({node.op_type}) computes in "
            f"{onnx.TensorProto.DataType.Name(weight.data_type).lower()} (weight {weight.name!r}): onnxflex "
            "quantizes layers that compute in float32 — convert the model to float32 first (re-export it, or "
            f"onnxconverter_common.float16.convert_float16_to_float32), or keep the node in float with "
            f"--exclude-node {node.name or '<its name>'}")


def unmatched_patterns(model: onnx.ModelProto, layers, config: PlanOptions) -> list[str]:
    """One warning per --exclude-node pattern that names no node of ``model`` (subgraphs included), per
    --exclude-op-type with no node of that type, and per --layer-bits pattern that names none of the
    quantized ``layers``: such a pattern is almost always a typo, and it changes nothing."""
    from fnmatch import fnmatchcase

    from onnxflex.graph import all_nodes

    nodes = all_nodes(model.graph)
    names, ops = [n.name for n in nodes], {n.op_type for n in nodes}
    found = [layer.node for layer in layers]
    out = [f"--exclude-node {p!r} matches no node of the model, so it keeps nothing in float (patterns are "
           "case-sensitive globs over the node names `onnxflex inspect` lists)"
           for p in config.exclude_nodes if not any(fnmatchcase(n, p) for n in names)]
    out += [f"--exclude-op-type {t!r}: the model has no {t} node, so it keeps nothing in float (op types are "
            f"case-sensitive: {', '.join(sorted(ops)[:8])}{', ...' if len(ops) > 8 else ''})"
            for t in config.exclude_op_types if t not in ops]
    out += [f"--layer-bits {p!r}={bits} matches none of the {len(found)} quantized layers, so it sets no "
            "layer's bits (patterns are case-sensitive globs over the layer names `onnxflex inspect` lists)"
            for p, bits in config.layer_bits if not any(fnmatchcase(n, p) for n in found)]
    return out


def _group_size(node: onnx.NodeProto, weight: onnx.TensorProto, bits: int, config: PlanOptions, target: Target,
                head: bool = False) -> int:
    """The config's group size for a MatMul, or a Gemm with transB=0, with a constant 2-D weight [K, N]
    (groups along K, the last one short where the size does not divide K); 0 (per channel) for every
    other op. A head above 4 bits is blocked where the target runs blocked int8 (onnxruntime:
    MatMulNBits bits=8), else per channel; any other node above 4 bits raises."""
    if not config.group_size or node.op_type not in ("MatMul", "Gemm") or node_attr(node, "transB", 0):
        return 0
    if bits > 4 and head:
        return config.group_size if onnx.TensorProto.INT8 in target.blocked_weight_dtypes else 0
    if bits > 4:
        raise ConfigError(f"layer_bits gives node {node.name!r} {bits} bits, but group_size={config.group_size} "
                          "writes 4-bit MatMul/Gemm weights: give it 2-4 bits, or keep it per channel with "
                          "group_size=0")
    return config.group_size


def activation_points(model: onnx.ModelProto, layers: tuple[QuantLayer, ...], target: Target,
                      config: PlanOptions) -> tuple[str, ...]:
    """Tensors that get Q/DQ: every layer's activation input; for fusing targets its output (taken
    after a single following activation in ``target.absorb``) unless a decoder's cache stores it
    (passes/kv_cache.cache_sources); for targets that fuse residual Adds the
    skip input of each such Add. Empty for weight-only runs."""
    if config.abits == 0:
        return ()
    float_tensors = _float_tensors(model)
    stored = cache_sources(model, set(LATER_LAYER_OPS))  # a decoder's cache keeps the float k/v outputs
    outputs = {node: point for node, point in _output_points(model, layers, target) if point not in stored}
    points: list[str] = []
    for layer in layers:
        candidates = [layer.input] + ([outputs[layer.node]] if layer.node in outputs else [])
        points += [t for t in candidates if t in float_tensors and t not in points]
    if target.quantize_residual_add:
        points += [t for t in residual_inputs(model, layers) if t in float_tensors and t not in points]
    return tuple(points)


def head_outputs(model: onnx.ModelProto, layers: tuple[QuantLayer, ...], target: Target) -> tuple[tuple[str, str], ...]:
    """(layer node, output point) of the ``layers`` whose output point reaches the graph outputs through
    float ops only (placement.final_tensors): the model's heads, whose calibrated range clips exactly
    the outputs the calibration data did not reach (rounding/reconstruct.calibrate_activations mirrors one
    whose values all lie below 0). Empty for targets that put no Q on weighted-op outputs."""
    final = final_tensors(model.graph)
    return tuple((node, point) for node, point in _output_points(model, layers, target) if point in final)


def _output_points(model: onnx.ModelProto, layers: tuple[QuantLayer, ...], target: Target) -> list[tuple[str, str]]:
    """(layer node, output point) of each layer, on targets that quantize weighted-op outputs."""
    if not target.quantize_outputs:
        return []
    users, outputs = consumers(model), {o.name for o in model.graph.output}
    by_name = {n.name: n for n in model.graph.node}
    return [(l.node, output_point(by_name[l.node].output[0], users, target.absorb, outputs)) for l in layers]


def residual_inputs(model: onnx.ModelProto, layers: tuple[QuantLayer, ...]) -> list[str]:
    """The skip input of each Add that joins a layer's output with another run-time tensor: the input
    that is not the output of the latest layer feeding the Add (the one the runtime fuses the Add into)."""
    layer_nodes = {layer.node for layer in layers}
    layer_outputs = {o for n in model.graph.node if n.name in layer_nodes for o in n.output}
    return list(residual_skips(model.graph.node, layer_outputs, {t.name for t in model.graph.initializer}))


def concat_ties(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor → name of the first Concat that reads it: activation quant points with the same Concat
    share one quantizer on targets that concatenate integers in place (``Target.shared_concat_scales``)."""
    ties: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "Concat":
            for name in node.input:
                ties.setdefault(name, node.name)
    return ties


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors known to be of a type QuantizeLinear reads (from inputs and inferred value_info; DOUBLE is
    not one); unknown types count as float."""
    typed = declared_types(model)
    names = set(graph_input_names(model)) | {o for n in model.graph.node for o in n.output}
    return {n for n in names if typed.get(n, onnx.TensorProto.FLOAT) in QUANTIZABLE_TYPES}
