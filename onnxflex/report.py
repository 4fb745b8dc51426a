"""The run report: a JSON document beside the output model and a short human summary."""
from __future__ import annotations

import collections
import json
import platform
import sys

import numpy as np

from onnxflex.runtimes.onnxruntime import INTEGER_KERNELS


def versions() -> dict[str, str]:
    import onnx
    import torch

    import onnxflex
    from onnxflex import ort

    return {"onnxflex": onnxflex.__version__, "onnx": onnx.__version__, "onnxruntime": ort.version(),
            "torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}


def build_report(result, warnings: list[str], total_seconds: float) -> dict:
    """The run's report from pipeline.PipelineResult ``result``: ``warnings`` are those the run logged
    (repeats dropped), ``total_seconds`` the whole run's time."""
    config, plan, samples = result.config, result.plan, result.samples
    blocks = block_rows(plan, result.reconstructed.results)
    budget = result.reconstructed.budget
    verification = result.verification
    return {
        "blocks": blocks,
        "plan": {"blocks": len(plan.blocks), "layers": len(plan.layers), "activation_points": len(plan.act_points),
                 "granularity": config.plan.granularity, "head_outputs": list(plan.head_points)},
        "verification": verification.to_dict() if verification else {},
        "latency_rules": result.verified.latency,
        **result.refined.sections,
        "timings": {**result.refined.timings, "passes": result.prepared_seconds,
                    "capture": result.captured.seconds, "reconstruct": result.reconstructed.seconds,
                    "emit": result.emitted.seconds, "verify": result.verified.seconds, "total": total_seconds},
        "config": config.to_dict(),
        "versions": versions(),
        "seed": config.rounding.seed,
        "calibration": {"source": samples.source, "reconstruction_samples": samples.recon.num_samples,
                        "verification_samples": samples.held.num_samples},
        "layers": layer_summary(plan, result.params),
        "heads": head_summary(plan),
        "reconstruction": reconstruction_summary(config.rounding, blocks, budget),
        "step_budget": budget.to_dict() if budget is not None else {},
        "warnings": list(dict.fromkeys(warnings)),
    }


def timeless(report: dict) -> dict:
    """``report`` without what the wall clock decides (timings, per-block seconds, the measured
    latency): what two runs with the same inputs and seed give identically."""
    from onnxflex.speed import MEASURED_KEYS

    out = {k: v for k, v in report.items() if k != "timings"}
    out["blocks"] = [{k: v for k, v in b.items() if k != "seconds"} for b in report.get("blocks", [])]
    out["latency_rules"] = {k: v for k, v in report.get("latency_rules", {}).items() if k not in MEASURED_KEYS}
    return out


def block_rows(plan, results) -> list[dict]:
    """One row per reconstructed block (rounding/reconstruct.BlockResult) with its layer count and the
    number of calibration samples its losses are over (``loss_samples``)."""
    layers_of = {b.name: len(b.layers) for b in plan.blocks}
    return [dict(name=r.name, layers=layers_of[r.name], runtime=r.runtime, loss_before=r.loss_before,
                 loss_after=r.loss_after, loss_samples=r.samples, iters=r.iters, seconds=r.seconds)
            for r in results]


def layer_summary(plan, params) -> list[dict]:
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


def head_summary(plan) -> list[dict]:
    """What each head (BlockPlan.heads) got: its weight bits (0: float) and group size (0: per channel)."""
    layers = {layer.node: layer for layer in plan.layers}
    return [{"node": node, "bits": layers[node].bits if node in layers else 0,
             "group_size": layers[node].group_size if node in layers else 0} for node in plan.heads]


def head_line(heads: list[dict]) -> list[str]:
    """The summary's line on the heads (none without one)."""
    if not heads:
        return []
    return ["head " + ", ".join(f"{h['node']}: " + (f"{h['bits']} bits" + (f", groups of {h['group_size']}"
                                                                          if h["group_size"] else "")
                                                   if h["bits"] else "float") for h in heads)]


def reconstruction_summary(config, blocks: list[dict], budget=None) -> dict:
    """What the preset resolved to (``config``: the run's RoundingOptions) and what ran: steps per block at
    most, samples per micro-batch (its ``batch_size``: the model's fixed batch where it has one), micro-batches
    per step (``accumulate``: more than 1 only on a fixed-batch model), early-stop patience (0: off), the
    preset's cap on the learning in FLOPs (``step_cap``, 0: none; the step_budget section says when it
    bit), the steps the blocks ran in all and how many blocks stopped early (before their own steps:
    ``budget``'s, a budget.StepBudget, or ``config.iters``)."""
    steps = [b["iters"] for b in blocks]
    planned = [budget.iters_of(i) if budget is not None else config.iters for i in range(len(blocks))]
    return {"preset": config.preset, "iters": config.iters, "batch_size": config.batch_size,
            "accumulate": config.accumulate, "early_stop": config.early_stop, "step_cap": config.step_cap,
            "steps_run": sum(steps),
            "steps_planned": sum(planned),
            "blocks_stopped_early": sum(0 < s < p for s, p in zip(steps, planned))}


def budget_lines(section: dict) -> list[str]:
    """The summary's line on the step_budget section (none when it is empty)."""
    if not section:
        return []
    rows = section["blocks"]
    learned = sum(1 for b in rows if b["steps"])
    return [f"step budget ({section['basis']}): {section['spent_flops'] / max(section['budget_flops'], 1e-30):.0%} "
            f"spent; {learned} of {len(rows)} block(s) learned, the others keep round-to-nearest"]


def loss_sample_lines(report: dict) -> list[str]:
    """The summary's line saying that block losses are on fewer samples than reconstruction has (the
    blocks that do not learn, all of them for a method that learns nothing:
    rounding/reconstruct.UNLEARNED_LOSS_SAMPLES); none when on all."""
    total = report["calibration"]["reconstruction_samples"]
    counts = {b["loss_samples"] for b in report["blocks"] if 0 < b.get("loss_samples", 0) < total}
    if not counts:
        return []
    return [f"block losses on {', '.join(map(str, sorted(counts)))} of the {total} calibration samples "
            "(blocks that do not learn; their losses are only reported)"]


def latency_lines(section: dict) -> list[str]:
    """The summary's line on the latency_rules section (none when it is empty)."""
    if not section:
        return []
    kept = section["kept_float"]
    floats = f"; {len(kept)} layer(s) kept float by the latency rule" if kept else ""
    predicted, measured = section["predicted_ratio_vs_fp32"], section["measured_ratio_vs_fp32"]
    shown = f"{measured:.2f}" if measured is not None else f"not measured ({section['measured']['skipped']})"
    return [f"latency vs FP32 (onnxruntime CPU): predicted {predicted if predicted is not None else 'unknown'}, "
            f"measured {shown}{floats}"]


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
    lines += loss_sample_lines(report)
    rec = report.get("reconstruction")
    if rec and rec["steps_run"]:
        stop = f"early stop after {rec['early_stop']} flat steps" if rec["early_stop"] else "no early stop"
        size = f"{rec['accumulate']} x {rec['batch_size']}" if rec.get("accumulate", 1) > 1 else rec["batch_size"]
        within = f", within the preset's cap of {rec['step_cap']:.3g} FLOPs" \
            if rec.get("step_cap") and not report.get("step_budget") else ""
        lines.append(f"preset {rec['preset']}: up to {rec['iters']} steps per block of {size} samples, "
                     f"{stop}{within}; {rec['steps_run']} steps run, {rec['blocks_stopped_early']} block(s) "
                     "stopped early")
    lines += budget_lines(report.get("step_budget") or {})
    v = report.get("verification", {})
    for name, db in v.get("quantized_vs_fp32_sqnr_db", {}).items():
        sim = v["onnxruntime_vs_simulation_sqnr_db"].get(name)
        lines.append(f"output {name}: SQNR vs FP32 {db:.1f} dB, onnxruntime vs simulation {sim:.1f} dB "
                     f"({v['samples']} held-out samples)")
    ops = v.get("optimized_graph_ops", {})
    kernels = {k: c for k, c in ops.items() if k.startswith("QLinear") or k in INTEGER_KERNELS}
    if ops:
        lines.append("onnxruntime integer kernels: " + (", ".join(f"{k}×{c}" for k, c in kernels.items()) or "none"))
    lines += latency_lines(report.get("latency_rules") or {})
    lines += head_line(report.get("heads") or [])
    cfg = report["config"]
    group = f" (MatMul/Gemm groups of {cfg['group_size']})" if cfg.get("group_size") else ""
    mixed = report.get("mixed_precision")
    weights = f"{cfg['wbits']}"
    if mixed:
        spread = collections.Counter(row["bits"] for row in mixed["layers"])
        lines.append(f"mixed precision ({', '.join(f'{k} {v:g}' for k, v in mixed['budget'].items())}): "
                     f"{mixed['average_bits']:.3f} average weight bits, {mixed['size_mb']:.4g} MiB packed, "
                     f"{mixed['emitted_mb']:.4g} MiB as emitted; weights at "
                     + ", ".join(f"{spread[b]}×{b}" for b in sorted(spread)) + " bits")
        weights = f"{mixed['average_bits']:.2f}"
    lines.append(f"method {cfg['method']}, W{weights}A{cfg['abits']}{group}, "
                 f"{report['timings']['total']:.1f}s total")
    return "\n".join(lines)
