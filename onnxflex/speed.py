"""The report's ``latency_rules`` section: a static cost model's predicted latency ratio vs FP32, and
the ratio measured on the emitted model after emission (report-only: nothing here changes a model).

Cost model (COST_MODEL; units of one float multiply-add, per sample of the shapes onnx infers for the
held-out batch). A float weighted layer costs its MACs, ``depth × output elements``
(placement.reduction_depth); an integer one ``INT_MAC × MACs + REQUANT × output elements`` (int8
products are cheaper, but every output is requantized), which is below the float cost only for a
depth above REQUANT / (1 - INT_MAC) = 32, the onnxruntime target's ``float_depth``. Every other node
costs ``ELEMENT`` per output element in both models. Each activation quant point adds ``QDQ`` per
element for a QuantizeLinear when a float op writes it and for a DequantizeLinear per float op that
reads it (between two integer kernels onnxruntime fuses both away). The predicted ratio is the
quantized plan's cost over the FP32 model's; tensors without an inferred shape count nothing.

The measurement runs the user's FP32 model and the emitted one in onnxruntime on the CPU, on one
held-out batch, in interleaved rounds (order alternating) for at most MEASURE_SECONDS after a warm-up,
and gives the median of the per-round ratios: a wall-clock figure that differs from run to run, which
is why it is only reported.
"""
from __future__ import annotations

import time

import numpy as np
import onnx

from onnxflex.graph import consumers, static_shapes

INT_MAC = 0.5
REQUANT = 16.0
ELEMENT = 1.0
QDQ = 2.0
COST_MODEL = {"int_mac": INT_MAC, "requant_per_output": REQUANT, "element_per_output": ELEMENT,
              "qdq_per_element": QDQ, "unit": "one float multiply-add"}
FUSED = ("Relu", "Clip")  # activations onnxruntime fuses into an integer kernel before its Q
MEASURE_SECONDS = 1.0
MIN_ROUNDS = 5
MAX_ROUNDS = 200


def predicted_ratio(plan, feed: dict[str, np.ndarray]) -> float | None:
    """The cost model's (module docstring) quantized / FP32 cost of ``plan`` (its canonical model,
    integer layers and activation points) on ``feed``'s shapes; None when no weighted layer's output
    has a known shape. A MatMul of two activations costs its MACs in both (K: its first input's last dim)."""
    from onnxflex.placement import reduction_depth

    model = plan.model
    shapes = {name: shape for name, (shape, _) in static_shapes(model, feed).items()}
    counts = {name: int(np.prod(shape)) for name, shape in shapes.items()}
    dims = {t.name: t.dims for t in model.graph.initializer}
    integer = {layer.node for layer in plan.layers}
    fp32 = quantized = 0.0
    known = False
    for node in model.graph.node:
        out = counts.get(node.output[0], 0) if node.output else 0
        weight = node.input[1] if len(node.input) > 1 else ""
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and weight in dims:
            known = known or out > 0
            macs = reduction_depth(node, dims[weight]) * out
            fp32 += macs
            quantized += INT_MAC * macs + REQUANT * out if node.name in integer else macs
        else:
            k = shapes.get(node.input[0], (1,))[-1:] if node.op_type == "MatMul" else ()
            cost = (k[0] if k else ELEMENT) * out
            fp32 += cost
            quantized += cost
    quantized += _boundaries(model, plan.act_points, integer, counts)
    return round(quantized / fp32, 3) if known and fp32 else None


def _boundaries(model: onnx.ModelProto, points, integer: set[str], counts: dict[str, int]) -> float:
    """QDQ cost of the activation points: a Q where a float op (or the graph input) writes the point,
    a DQ per float op reading it. The ends an integer layer writes (directly or through a Relu/Clip
    fused into its kernel) or reads as its input 0 are free."""
    users = consumers(model)
    writer = {o: n for n in model.graph.node for o in n.output}
    cost = 0.0
    for point in points:
        n = counts.get(point, 0)
        node = writer.get(point)
        if node is not None and node.op_type in FUSED and node.input:
            node = writer.get(node.input[0], node) if node.input[0] in writer and \
                writer[node.input[0]].name in integer else node
        if node is None or node.name not in integer:
            cost += QDQ * n
        cost += QDQ * n * sum(r.name not in integer or r.input[0] != point for r in users.get(point, []))
    return cost


def measured_ratio(fp32: onnx.ModelProto, quantized: onnx.ModelProto, feed: dict[str, np.ndarray],
                   threads: int = 0, seconds: float | None = None) -> dict:
    """Times ``fp32`` (the user's model, copied and its nodes named uniquely for onnxruntime) against
    ``quantized`` on ``feed`` (each session given the inputs it declares), CPU, ``threads`` intra-op
    threads (0: onnxruntime's choice), in ort.timing_sessions (warmed up, as a user's session runs), then
    rounds alternating which model runs first until ``seconds`` (default MEASURE_SECONDS) have passed (at
    least MIN_ROUNDS, at most MAX_ROUNDS rounds). Neither model is changed. Returns the median per-round
    ratio and the medians in milliseconds."""
    from onnxflex import ort
    from onnxflex.graph import load_model, name_nodes_uniquely

    seconds = MEASURE_SECONDS if seconds is None else seconds
    reference = load_model(fp32)
    name_nodes_uniquely(reference)
    sessions = ort.timing_sessions([reference, quantized], feed, threads)
    feeds = [ort.declared(s, feed) for s in sessions]
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while len(times[0]) < MAX_ROUNDS and (len(times[0]) < MIN_ROUNDS or time.perf_counter() - start < seconds):
        for k in ((0, 1) if len(times[0]) % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(max(time.perf_counter() - t, 1e-9))
    batch = int(np.shape(next(iter(feed.values())))[0]) if feed and np.ndim(next(iter(feed.values()))) else 1
    return {"measured_ratio_vs_fp32": round(float(np.median(np.divide(times[1], times[0]))), 3),
            "measured": {"fp32_ms": round(1e3 * float(np.median(times[0])), 4),
                         "quantized_ms": round(1e3 * float(np.median(times[1])), 4),
                         "rounds": len(times[0]), "batch": batch, "threads": threads}}


MEASURED_KEYS = ("measured_ratio_vs_fp32", "measured")
"""The section's wall-clock keys: they differ from run to run (report.timeless drops them)."""


def latency_section(plan, target, enabled: bool, shapes: dict[str, np.ndarray], timed: dict) -> dict:
    """The report's ``latency_rules`` section: whether the rule ran (``enabled``: the config's
    latency_rules), the target's float_depth, the layers it kept float (node, op type, depth), the
    cost model and its predicted ratio on the shapes of ``shapes`` (a feed), and ``timed``
    (measured_ratio's result, or {"measured_ratio_vs_fp32": None, "measured": {"skipped": why}})."""
    return {"enabled": enabled, "float_depth": target.float_depth,
            "kept_float": [{"node": node, "op_type": op, "depth": depth} for node, op, depth in plan.latency_floats],
            "cost_model": COST_MODEL,
            "predicted_ratio_vs_fp32": predicted_ratio(plan, shapes) if shapes else None,
            **timed}
