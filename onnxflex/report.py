"""The run report: a JSON document beside the output model and a short human summary."""
from __future__ import annotations

import json
import platform
import sys

import numpy as np


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    import onnxflex

    return {"onnxflex": onnxflex.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}


def layer_summary(plan, params, config) -> list[dict]:
    rows = []
    for layer in plan.layers:
        qw = params.weights.get(layer.weight)
        row = {"node": layer.node, "op_type": layer.op_type, "weight": layer.weight, "bits": layer.bits,
               "axis": layer.axis, "group_size": layer.group_size}
        if qw is not None:
            row.update(channels=int(qw.scale.size), scale_min=float(qw.scale.min()), scale_max=float(qw.scale.max()),
                       int_min=int(qw.ints.min()), int_max=int(qw.ints.max()))
        rows.append(row)
    return rows


def to_json(report: dict) -> str:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    def clean(o):
        if isinstance(o, float) and not np.isfinite(o):
            return str(o)
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(report), indent=2, default=default) + "\n"


def summary(report: dict) -> str:
    """A fixed-width table of blocks and the verification figures."""
    lines = [f"{'block':<12}{'layers':>7}{'runtime':>10}{'loss before':>14}{'loss after':>13}{'seconds':>9}"]
    for b in report["blocks"]:
        lines.append(f"{b['name']:<12}{b['layers']:>7}{b['runtime']:>10}{b['loss_before']:>14.4g}"
                     f"{b['loss_after']:>13.4g}{b['seconds']:>9.1f}")
    v = report.get("verification", {})
    for name, db in v.get("quantized_vs_fp32_sqnr_db", {}).items():
        sim = v["onnxruntime_vs_simulation_sqnr_db"].get(name)
        lines.append(f"output {name}: SQNR vs FP32 {db:.1f} dB, onnxruntime vs simulation {sim:.1f} dB "
                     f"({v['samples']} held-out samples)")
    ops = v.get("optimized_graph_ops", {})
    kernels = {k: c for k, c in ops.items() if k.startswith("QLinear") or k in ("QGemm", "MatMulNBits")}
    if ops:
        lines.append("onnxruntime integer kernels: " + (", ".join(f"{k}×{c}" for k, c in kernels.items()) or "none"))
    cfg = report["config"]
    group = f" (MatMul groups of {cfg['group_size']})" if cfg.get("group_size") else ""
    lines.append(f"method {cfg['method']}, W{cfg['wbits']}A{cfg['abits']}{group}, "
                 f"{report['timings']['total']:.1f}s total")
    return "\n".join(lines)
