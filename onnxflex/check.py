"""``onnxflex check``: will a QDQ model run as integers on a target, layer by layer?

Three sources, in order of what they can prove:
  static rules (runtimes.rules, from the target's data) — always;
  onnxruntime's optimized graph (target onnxruntime) — which fused kernel each layer became;
  a TensorRT engine build (target tensorrt) — per-layer precision, only with TensorRT and a GPU.
What could not be verified is said in the report, never silently skipped. LSTMs count as layers where
the target runs them with integer weights (onnxruntime: com.microsoft DynamicQuantizeLSTM); GRU and
RNN have no integer kernel there and get a warning. Layers inside If branches
and Loop/Scan bodies are listed too and judged by the optimized graph, which onnxruntime writes with
the subgraphs kept in the node attributes (the op counts include their kernels).
"""
from __future__ import annotations

import collections
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import onnx

from onnxflex.graph import all_nodes, load_model, node_attr
from onnxflex.registry import Registry
from onnxflex.runtimes.rules import LATENCY_FLOAT, Finding, GraphView, recurrent_nodes, static_findings
from onnxflex.runtimes.targets import get_target

FLOAT_KERNELS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "LSTM")


@dataclass(frozen=True)
class LayerStatus:
    """One weighted node: ``integer`` is False when a fallback or latency-float finding names it;
    ``kernel`` is what the runtime made of it (onnxruntime's optimized op, or TensorRT precisions), ''
    when not known."""

    node: str
    op_type: str
    integer: bool
    kernel: str = ""


@dataclass(frozen=True)
class CheckReport:
    source: str
    target: str
    findings: tuple[Finding, ...]
    layers: tuple[LayerStatus, ...]
    runtime_ops: dict[str, int] = field(default_factory=dict)
    not_verified: tuple[str, ...] = ()

    @property
    def fallbacks(self) -> list[Finding]:
        return [f for f in self.findings if f.fallback]

    @property
    def ok(self) -> bool:
        """No layer, Add or Concat falls back to float (warnings allowed)."""
        return not self.fallbacks

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "ok": self.ok,
                "findings": [asdict(f) for f in self.findings], "layers": [asdict(l) for l in self.layers],
                "runtime_ops": dict(self.runtime_ops), "not_verified": list(self.not_verified)}


def check(model: str | os.PathLike | onnx.ModelProto, target: str = "onnxruntime", *,
          runtime: bool = True) -> CheckReport:
    """Check ``model`` (path or ModelProto, left unchanged) against ``target``'s static rules and, with
    ``runtime``, ask the runtime itself (``Target.runtime_check``): onnxruntime's optimized graph, or a
    TensorRT engine build where TensorRT and a GPU are present."""
    spec = get_target(target)
    proto = load_model(model)
    source = str(model) if not isinstance(model, onnx.ModelProto) else (proto.graph.name or "model")
    findings = static_findings(proto, spec)
    view = GraphView(proto)
    if runtime:
        result = RUNTIME_CHECKS.get(spec.runtime_check)(proto, view)
    else:
        result = RuntimeResult(not_verified=(f"{spec.runtime_check} check not run (--static-only); placement "
                                             "and encoding were checked statically only",))
    findings = by_design(findings + list(result.findings))
    failed = {f.node for f in findings if f.fallback or f.rule == LATENCY_FLOAT}  # float either way
    inner = subgraph_layers(proto)
    layers = tuple(LayerStatus(n.name, n.op_type, n.name not in failed, result.kernels.get(n.name, ""))
                   for n in list(view.layers) + nbits_layers(view) + recurrent_nodes(view, spec) + inner)
    if inner:
        result = RuntimeResult(result.findings, result.kernels, result.ops, result.not_verified + (
            f"the static rules cover top-level layers; the {len(inner)} layer(s) inside If/Loop/Scan subgraphs "
            "are judged by the runtime check alone",))
    return CheckReport(source, spec.name, tuple(findings), layers, result.ops, result.not_verified)


def by_design(findings: list[Finding]) -> list[Finding]:
    """``findings`` without the fallbacks of layers kept float by the latency rule (a LATENCY_FLOAT
    warning names each and its reason): a float weight, float inputs and a float kernel are what that
    rule meant, not a placement that failed."""
    intended = {f.node for f in findings if f.rule == LATENCY_FLOAT}
    return [f for f in findings if f.node not in intended or f.rule == LATENCY_FLOAT]


@dataclass(frozen=True)
class RuntimeResult:
    """What asking the runtime itself showed: fallback findings, layer name → kernel or precision,
    op counts of the runtime's graph, and what could not be verified."""

    findings: tuple[Finding, ...] = ()
    kernels: dict[str, str] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)
    not_verified: tuple[str, ...] = ()


RUNTIME_CHECKS: Registry[Callable[[onnx.ModelProto, GraphView], RuntimeResult]] = Registry("runtime check")


@RUNTIME_CHECKS.register("onnxruntime-graph")
def onnxruntime_kernels(model: onnx.ModelProto, view: GraphView) -> RuntimeResult:
    """Load the model in onnxruntime (CPU) and read the op each layer became in the optimized graph.

    Fused nodes keep the layer's name or extend it with '_token_<n>'; a layer still a float
    Conv/Gemm/MatMul there runs in float."""
    from onnxflex import ort

    with tempfile.TemporaryDirectory(prefix="onnxflex-check-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = ort.session_options(matmulnbits=False, optimized_path=path, extended_only=True)
        try:
            ort.session(model, list(ort.CPU), opts=opts)
        except Exception as exc:  # onnxruntime raises several unrelated types
            return RuntimeResult((Finding("(model)", "", "load", f"onnxruntime cannot load the model: {exc}"),))
        optimized = all_nodes(onnx.load(path).graph)  # subgraph kernels too: If branches, Loop/Scan bodies
    counts = dict(sorted(collections.Counter(n.op_type for n in optimized).items()))
    kernels, findings = {}, []
    for layer in (list(view.layers) + nbits_layers(view) + recurrent_nodes(view, get_target("onnxruntime"))
                  + subgraph_layers(model)):
        match = [n for n in optimized if n.name == layer.name or n.name.startswith(layer.name + "_token_")]
        if not match:
            continue
        kernels[layer.name] = match[0].op_type
        if match[0].op_type in FLOAT_KERNELS:
            findings.append(Finding(layer.name, layer.op_type, "runtime-kernel", f"onnxruntime's optimized graph "
                                    f"runs it as a float {match[0].op_type}, not an integer kernel"))
    return RuntimeResult(tuple(findings), kernels, counts,
                         ("onnxruntime's CPU execution provider only; other providers fuse differently",))


def nbits_layers(view: GraphView) -> list[onnx.NodeProto]:
    """The com.microsoft MatMulNBits of the top-level graph whose packed weight is a constant: the
    weight-only layers onnxflex writes in that form (emit/nbits.py). They are integer by construction,
    so the Q/DQ rules do not apply to them; the runtime check reads their kernel like any layer's."""
    return [n for n in view.nodes if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"
            and len(n.input) > 1 and n.input[1] in view.inits]


def subgraph_layers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Weighted nodes inside If branches and Loop/Scan bodies (any depth) whose weight is a constant or
    a DequantizeLinear of one in their own graph, and the MatMulNBits there (nbits_layers)."""
    found = []
    for node in all_nodes(model.graph):
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                wrapper = onnx.ModelProto()
                wrapper.graph.CopyFrom(sub)
                wrapper.opset_import.extend(model.opset_import)
                view = GraphView(wrapper)
                found += list(view.layers) + nbits_layers(view)
    return found


@RUNTIME_CHECKS.register("tensorrt-engine")
def tensorrt_engine(model: onnx.ModelProto, view: GraphView) -> RuntimeResult:
    """Build a TensorRT engine and read each layer's precision; says why when it cannot."""
    from onnxflex.runtimes.tensorrt import build_engine

    report = build_engine(model)
    if report.skipped:
        return RuntimeResult(not_verified=(f"TensorRT engine check not run: {report.skipped}; placement and "
                                           "encoding were checked statically only",))
    if not report.built:
        return RuntimeResult((Finding("(model)", "", "engine", "TensorRT: " + "; ".join(report.errors)),))
    kernels, findings = {}, []
    for layer in view.layers:
        precisions = sorted({p for name, _, p in report.layers if layer.name in name.split(" + ")
                             or layer.name in name})
        if not precisions:
            continue
        kernels[layer.name] = "/".join(precisions)
        dq = view.weight_dq(layer)
        weight_only = dq is not None and node_attr(dq, "block_size", 0)  # float activations by design
        if precisions == ["float"] and not weight_only:
            findings.append(Finding(layer.name, layer.op_type, "engine", "the TensorRT engine runs it in float"))
    return RuntimeResult(tuple(findings), kernels)


def format_report(report: CheckReport) -> str:
    """Human-readable lines: findings per node, a layer tally, runtime ops, what was not verified."""
    lines = [f"check {report.source} for target {report.target}"]
    for f in report.findings:
        where = f"{f.node} ({f.op_type})" if f.op_type else f.node
        lines.append(f"  {'FALLBACK' if f.fallback else 'warning '}  {where}  [{f.rule}] {f.message}")
    intended = {f.node for f in report.findings if f.rule == LATENCY_FLOAT}
    integer = sum(l.integer for l in report.layers)
    floats = f" ({len(intended)} float by the latency rule)" if intended else ""
    lines.append(f"layers: {integer} of {len(report.layers)} run as integers on {report.target}{floats}")
    for layer in report.layers:
        kernel = f" -> {layer.kernel}" if layer.kernel else ""
        state = "float   " if layer.node in intended else "ok      " if layer.integer else "FALLBACK"
        lines.append(f"  {state}  {layer.node} ({layer.op_type}){kernel}")
    if report.runtime_ops:
        lines.append("onnxruntime optimized graph: " + ", ".join(f"{k}×{c}" for k, c in report.runtime_ops.items()))
    lines += [f"not verified: {line}" for line in report.not_verified]
    n = len({f.node for f in report.fallbacks})
    lines.append("result: OK" if report.ok else f"result: FAIL ({n} node{'s' if n != 1 else ''} fall back to float)")
    return "\n".join(lines)

