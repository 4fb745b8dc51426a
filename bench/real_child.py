"""One quantization of bench/real_models.py, run as its own process (bench/child.py measures it):

    python bench/real_child.py KIND MODEL CALIB.npz OUT.onnx OPTIONS_JSON

KIND is ``onnxflex`` (OPTIONS are QuantConfig fields), ``ort_static`` (onnxruntime's quantize_static,
QDQ, per channel: ``types`` as ACT_WEIGHT QuantType names, ``calibrate``, ``batch``) or ``ort_nbits``
(MatMulNBitsQuantizer's round-to-nearest: ``block_size``, ``symmetric``; it needs ``pip install -e '.[bench]'``,
which brings onnx-ir; it packs MatMul weights only, so plain Gemms with a weight initializer are made
MatMul + Add first, and the note says how many). Both onnxruntime kinds read the same npz,
each input sliced along its samples axis (``axes``, default 0) and the pinned inputs (``fixed``) fed as
given. A model below opset 13 is converted to 13 (onnx.version_converter) before quantize_static, whose
per-channel DequantizeLinear needs the ``axis`` of opset 13 (it writes an invalid model otherwise); the
row's note says so. Weights and biases that the model holds as Constant nodes (Paddle exports do) are
moved into initializers first: quantize_static quantizes only initializers as weights, and reads any
other weight input as an activation (uint8, per tensor, whatever weight type was asked), so without
the move a U8S4 row would run 8-bit weights. The note says so too. Prints one JSON line: the seconds taken, the CPU seconds of all its threads since it started
(imports included), the child's own peak RSS, and for onnxflex
whether its own verification passed.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from child import peak_rss_mib

PER_CHANNEL_OPSET = 13


def npz_reader(model: str, calib: str, batch: int, axes: dict, fixed: dict):
    """An onnxruntime CalibrationDataReader over ``calib``: batches of ``batch`` samples."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    inputs = {i.name: i.type.tensor_type.elem_type for i in onnx.load(model, load_external_data=False).graph.input}
    with np.load(calib) as data:
        arrays = {k: data[k] for k in inputs if k not in fixed}
    pinned = {k: np.array(v, onnx.helper.tensor_dtype_to_np_dtype(inputs[k])) for k, v in fixed.items()}
    total = next(iter(arrays.values())).shape[axes.get(next(iter(arrays)), 0)]

    class NpzReader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{**{k: np.take(v, range(i, min(i + batch, total)), axes.get(k, 0))
                                     for k, v in arrays.items()}, **pinned} for i in range(0, total, batch)])

        def get_next(self):
            return next(self.batches, None)

    return NpzReader()


WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "MatMul": (1,), "Gemm": (1, 2)}  # weight, bias


def quantize_onnxflex(model: str, calib: str, out: str, options: dict) -> dict:
    import onnxflex
    from onnxflex.errors import VerificationError

    config = onnxflex.QuantConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    try:
        onnxflex.quantize(model, calib, config, progress=False).save(out)
        return {"verified": True}
    except VerificationError as exc:  # the model is still written: its numbers are the result
        if exc.result is None:
            raise
        exc.result.save(out)
        return {"verified": False, "note": str(exc).splitlines()[0][:160]}


def quantize_ort_static(model: str, calib: str, out: str, options: dict) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    act, weight = options["types"].split("_")
    reader = npz_reader(model, calib, options["batch"], options.get("axes", {}), options.get("fixed", {}))
    source, figures = ort_source(model, out)
    quantize_static(source, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, weight),
                    calibrate_method=getattr(CalibrationMethod, options["calibrate"]))
    return with_coverage(figures, out)


def with_coverage(figures: dict, out: str, ops=tuple(WEIGHT_INPUTS)) -> dict:
    """``figures`` with a note, when onnxruntime's output ``out`` left some of its weighted layers of ``ops``
    float, saying how many it quantized (a row whose numbers are FP32's is not a quantized result)."""
    done, total = quantized_layers(out, ops)
    if done == total:
        return figures
    said = f"weights of {done} of {total} weighted layers quantized"
    return {**figures, "note": f"{figures['note']}, {said}" if "note" in figures else said}


def quantized_layers(path: str, ops=tuple(WEIGHT_INPUTS)) -> tuple[int, int]:
    """(weighted layers whose weight is integer, all weighted layers) of ``ops`` over every graph of the
    model at ``path``, If/Loop bodies included: a node counts when its weight (WEIGHT_INPUTS) is the output
    of a DequantizeLinear in its own graph or an enclosing one; a MatMulNBits node always counts."""
    import onnx

    def walk(graph, outer: dict) -> tuple[int, int]:
        made = {**outer, **{o: n.op_type for n in graph.node for o in n.output}}
        done = total = 0
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                done, total = done + 1, total + 1
            elif node.op_type in ops and len(node.input) > 1:
                total += 1
                done += made.get(node.input[WEIGHT_INPUTS[node.op_type][0]]) == "DequantizeLinear"
            for attr in node.attribute:
                for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    d, t = walk(body, made)
                    done, total = done + d, total + t
        return done, total

    return walk(onnx.load(path, load_external_data=False).graph, {})


def ort_source(model: str, out: str) -> tuple[str, dict]:
    """(``model``, {}) when quantize_static can take it as it is, else (the model at opset 13 or above with
    its Constant-node weights and biases as initializers, written beside ``out``, a note saying which)."""
    import onnx
    from onnx import version_converter

    loaded = onnx.load(model)
    notes = []
    moved = constant_weights_to_initializers(loaded)
    if moved:
        notes.append(f"{moved} Constant-node weights made initializers")
    opset = next(o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx"))
    if opset < PER_CHANNEL_OPSET:
        loaded = version_converter.convert_version(loaded, PER_CHANNEL_OPSET)
        notes.append(f"opset {opset} converted to {PER_CHANNEL_OPSET} first")
    if not notes:
        return model, {}
    path = f"{out}.source.onnx"
    onnx.save(loaded, path)
    return path, {"note": ", ".join(notes)}


def constant_weights_to_initializers(model) -> int:
    """Move the Constant nodes (``value`` attribute) that a weighted node of the main graph reads as its
    weight or bias (WEIGHT_INPUTS) into initializers of the same name; mutates ``model``, returns how many."""
    graph = model.graph
    wanted = {node.input[i] for node in graph.node for i in WEIGHT_INPUTS.get(node.op_type, ())
              if i < len(node.input) and node.input[i]}
    keep, moved = [], 0
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and node.output[0] in wanted:
            tensor = type(value)()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return moved


def gemms_to_matmuls(model) -> int:
    """Mutates ``model``: each main-graph Gemm with a weight initializer B, ``alpha`` = ``beta`` = 1 and A not
    transposed becomes MatMul(A, B as [K, N]) then Add(C) (C absent: no Add), the same function; returns
    how many. MatMulNBitsQuantizer packs MatMul weights only, so a model whose weights sit in a Gemm (a
    recogniser's classifier) would otherwise run its 4-bit row in float."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, moved = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(
            np.ascontiguousarray(weight.T if attrs.get("transB", 0) else weight), node.input[1]))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [product], name=node.name))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}_bias"))
        moved += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return moved


def quantize_ort_nbits(model: str, calib: str, out: str, options: dict) -> dict:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    block, symmetric = options["block_size"], options["symmetric"]
    source = onnx.load(model)
    gemms = gemms_to_matmuls(source)
    quantizer = nbits.MatMulNBitsQuantizer(source, bits=4, block_size=block, is_symmetric=symmetric,
                                           algo_config=nbits.DefaultWeightOnlyQuantConfig(block_size=block,
                                                                                          is_symmetric=symmetric))
    quantizer.process()
    quantizer.model.save_model_to_file(out, False)
    packed = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)
    note = f"{packed} MatMul{'' if packed == 1 else 's'} as MatMulNBits"
    if gemms:
        note += f", {gemms} Gemm{'' if gemms == 1 else 's'} made MatMul first"
    return with_coverage({"note": note}, out, ops=("MatMul",))


KINDS = {"onnxflex": quantize_onnxflex, "ort_static": quantize_ort_static, "ort_nbits": quantize_ort_nbits}


def main() -> None:
    kind, model, calib, out, options = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    started = time.perf_counter()
    figures = KINDS[kind](model, calib, out, options)
    print()
    print(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time(), **figures,
                      "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
