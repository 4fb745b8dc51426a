"""strip_qdq: refuse an already-quantized model, or with ``requantize`` turn a QDQ model back to float.

Without ``config.requantize`` a model holding QuantizeLinear/DequantizeLinear nodes is refused with
an error that names them: quantizing it again would stack a second set of rounding errors on the
first, which is rarely what the user meant. With it:
  * a DequantizeLinear of constant integers (a weight, an int32 bias) becomes the float initializer
    it computes, under the DequantizeLinear's output name;
  * a QuantizeLinear → DequantizeLinear pair on a tensor is dropped: the DequantizeLinear's readers
    read the QuantizeLinear's float input (through an Identity that canonicalize removes).
The float model that results is then quantized afresh. Models quantized in operator form (QLinearConv,
MatMulInteger, ...) hold no float weights to recover and are always refused. Only the top-level graph
is examined: Q/DQ inside control-flow subgraphs stays as it is, like everything in subgraphs.
"""
from __future__ import annotations

import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxflex.errors import UnsupportedModelError
from onnxflex.extdata import tensor_array
from onnxflex.graph import drop_unused_initializers
from onnxflex.passes.context import PassContext

QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
OPERATOR_FORM = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
                 "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
                 "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSoftmax", "QAttention",
                 "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QOrderedMatMul"}
SHOWN = 3  # node names quoted in an error before "and N more"


def _label(node: onnx.NodeProto) -> str:
    return repr(node.name) if node.name else f"(unnamed, output {node.output[0]!r})"


def _listing(nodes: list[onnx.NodeProto]) -> str:
    shown = ", ".join(_label(n) for n in nodes[:SHOWN])
    return shown + (f" and {len(nodes) - SHOWN} more" if len(nodes) > SHOWN else "")


def _is_qdq(node: onnx.NodeProto, op_type: str | None = None) -> bool:
    return node.domain in QDQ_DOMAINS and node.op_type in ((op_type,) if op_type else QDQ_OPS)


def strip_qdq(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Returns ``model`` unchanged when it holds no Q/DQ nodes; raises UnsupportedModelError for a
    quantized model unless ``ctx.config.requantize``; otherwise mutates ``model`` into its float
    form (see the module docstring) and returns it."""
    g = model.graph
    operator_form = [n for n in g.node if n.op_type in OPERATOR_FORM]
    if operator_form:
        raise UnsupportedModelError(
            f"the model is already quantized in operator form ({operator_form[0].op_type} node(s) "
            f"{_listing(operator_form)}); onnxflex can only requantize QDQ models: quantize the float "
            "model it was made from")
    found = [n for n in g.node if _is_qdq(n)]
    if not found:
        return model
    if not ctx.config.requantize:
        raise UnsupportedModelError(
            f"the model is already quantized: it has {len(found)} QuantizeLinear/DequantizeLinear node(s) "
            f"({_listing(found)}); pass --requantize (QuantConfig(requantize=True)) to dequantize it back to "
            "float and quantize it afresh, or quantize the float model it was made from")
    pairs, weights = _strip(model)
    ctx.warnings.append(f"requantize: dropped {pairs} QuantizeLinear/DequantizeLinear pair(s) and dequantized "
                        f"{weights} integer initializer(s) back to float before quantizing afresh")
    return model


def _strip(model: onnx.ModelProto) -> tuple[int, int]:
    """Mutates ``model``; returns (pairs dropped, initializers dequantized)."""
    g = model.graph
    consts = _constants(model)
    producer = {o: n for n in g.node for o in n.output if o}
    graph_outputs = {o.name for o in g.output}
    replaced: dict[int, onnx.NodeProto | None] = {}  # id(DQ node) → Identity, or None when folded
    pairs = weights = 0
    for node in g.node:
        if not _is_qdq(node, "DequantizeLinear"):
            continue
        source = producer.get(node.input[0])
        if source is not None and _is_qdq(source, "QuantizeLinear"):
            replaced[id(node)] = helper.make_node("Identity", [source.input[0]], [node.output[0]],
                                                  name=node.name)
            pairs += 1
        elif all(i in consts for i in node.input if i):
            g.initializer.append(numpy_helper.from_array(_dequantize(node, consts, model), node.output[0]))
            replaced[id(node)] = None
            weights += 1
        else:
            raise UnsupportedModelError(
                f"DequantizeLinear {_label(node)} reads {node.input[0]!r}, which is neither a constant nor a "
                "QuantizeLinear output; --requantize handles QDQ models whose integer tensors are weights "
                "or Q/DQ pairs: quantize the float model it was made from")
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    kept = []
    for node in g.node:
        if id(node) in replaced:
            if replaced[id(node)] is not None:
                kept.append(replaced[id(node)])
            continue
        if _is_qdq(node, "QuantizeLinear"):
            others = [r for r in readers.get(node.output[0], []) if id(r) not in replaced]
            if others or node.output[0] in graph_outputs:
                where = f"node {_label(others[0])} ({others[0].op_type})" if others else "a graph output"
                raise UnsupportedModelError(
                    f"QuantizeLinear {_label(node)} feeds {where} with integers, not a DequantizeLinear; "
                    "--requantize only undoes QuantizeLinear → DequantizeLinear pairs: quantize the float "
                    "model it was made from")
            continue
        kept.append(node)
    del g.node[:]
    g.node.extend(kept)
    drop_unused_initializers(model)
    return pairs, weights


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node values by name."""
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            try:
                value = ReferenceEvaluator(node).run(None, {})[0]
            except Exception:  # sparse or exotic constants are not Q/DQ parameters
                continue
            consts[node.output[0]] = numpy_helper.from_array(value, node.output[0])
    return consts


def _dequantize(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto], model: onnx.ModelProto):
    """What ``node`` (a DequantizeLinear of constants) computes, by onnx's reference implementation
    (so axis, block_size and int4 follow the spec)."""
    plain = onnx.NodeProto()
    plain.CopyFrom(node)
    plain.domain = ""
    feeds = {i: tensor_array(consts[i], model) for i in node.input if i}  # external data too
    return ReferenceEvaluator(plain).run(None, feeds)[0]
