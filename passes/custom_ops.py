"""Ops outside the standard ONNX domain (com.microsoft, ai.onnx.ml, a vendor's own domain).

onnxflex has no torch converter for them, so the blocks holding them run in onnxruntime (weights
round-to-nearest, nothing learned). That needs an onnxruntime kernel for each such op; this check
finds the ops onnxruntime cannot run before any calibration work starts and names them.
"""
from __future__ import annotations

import onnx
from onnx import helper

from onnxflex.errors import UnsupportedModelError
from onnxflex.graph import DEFAULT_DOMAINS



def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Top-level nodes whose domain is not the standard ONNX domain, in graph order."""
    return [n for n in model.graph.node if n.domain not in DEFAULT_DOMAINS]


def check_custom_ops(model: onnx.ModelProto) -> None:
    """Raises UnsupportedModelError naming each custom-domain op (op type, domain, node) that the
    installed onnxruntime cannot run on the CPU; returns quietly when onnxruntime loads the model."""
    found = custom_nodes(model)
    if not found:
        return
    error = _load_error(model)
    if error is None:
        return
    culprits = [n for n in _distinct(found) if _load_error(_single_node_model(model, n)) is not None]
    if not culprits:
        return  # the model fails for another reason, which capture reports
    names = "; ".join(f"{n.op_type} (domain {n.domain!r}, node {n.name!r})" for n in culprits)
    raise UnsupportedModelError(
        f"onnxruntime cannot run the custom-domain op(s) {names}, so onnxflex cannot capture or simulate "
        f"them ({error}); replace them with standard ONNX ops when exporting, or use an onnxruntime build "
        "that implements them")


def _distinct(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The first node of each (domain, op type)."""
    seen: dict[tuple[str, str], onnx.NodeProto] = {}
    for n in nodes:
        seen.setdefault((n.domain, n.op_type), n)
    return list(seen.values())


def _single_node_model(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.ModelProto:
    """``node`` alone, every input a graph input typed as the model knows it (float when unknown);
    initializers become inputs of their type and shape, so no tensor data is read."""
    g = model.graph
    typed = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    typed.update({t.name: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer})
    inputs = [typed.get(i) or helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, None)
              for i in dict.fromkeys(i for i in node.input if i)]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = helper.make_graph([node], "probe", inputs, outputs)
    probe = helper.make_model(graph, opset_imports=list(model.opset_import))
    probe.ir_version = model.ir_version
    return probe


def _load_error(model: onnx.ModelProto) -> str | None:
    """onnxruntime's one-line complaint when it cannot load ``model`` on the CPU, else None."""
    from onnxflex import ort

    return ort.load_error(model, ort.CPU, ort.session_options(matmulnbits=False))
