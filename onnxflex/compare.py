"""``onnxflex compare``: how far a candidate model (e.g. quantized) is from its reference (FP32).

Outputs are compared by SQNR, cosine, max abs error and top-1 agreement (for classifier-shaped
outputs: float, last axis ≥ 2 wide); intermediate tensors that both graphs produce under the same
name are ranked by SQNR; both models are timed in onnxruntime on the same batch and threads.
Statistics are accumulated batch by batch, so memory does not grow with the evaluation set.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxflex.calib import CalibrationSet, check_calibration, fixed_batch, read_npz
from onnxflex.errors import CalibrationError, ModelLoadError
from onnxflex.graph import graph_input_names, load_model
from onnxflex.inputs import InputOptions
from onnxflex.ort import session, timing_sessions
from onnxflex.placement import NUMPY_FLOAT_TYPES
from onnxflex.probes import tensor_layout, with_probes
from onnxflex.timing import MAX_SECONDS, WIDTH, RatioEstimate, measure_ratio, ratio_gate

PROVIDERS = ["CPUExecutionProvider"]


@dataclass(frozen=True)
class GateOptions:
    """Thresholds that turn a comparison into a pass/fail gate; None disables a gate."""

    min_sqnr: float | None = None
    min_agreement: float | None = None
    max_latency_ratio: float | None = None


class _Stats:
    """Running sums for SQNR, cosine, max abs error and top-1 agreement of one tensor."""

    def __init__(self) -> None:
        self.signal = self.noise = self.cosine_sum = 0.0
        self.max_abs = 0.0
        self.count = self.agree = self.positions = 0
        self.classifier = False
        self.skipped = ""  # why batches added nothing: "sequence-typed" or "empty"

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        """Adds one batch. Sequence-typed values (lists) and empty tensors add nothing; a 0-d tensor counts
        as one row; integer and bool tensors are compared as numbers; non-finite values must match."""
        if not isinstance(ref, np.ndarray) or not isinstance(got, np.ndarray) or ref.size == 0:
            self.skipped = "empty" if isinstance(ref, np.ndarray) else "sequence-typed"
            return
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        if ref.ndim == 0:
            ref, got = ref.reshape(1), got.reshape(1)
        if ref.shape != got.shape:
            raise ModelLoadError(f"shapes differ: reference {list(ref.shape)} vs candidate {list(got.shape)}")
        # -inf masks (attention) and NaN guards: equal non-finite values agree and add nothing; a
        # non-finite value where the other model has a different one makes the noise infinite
        finite = np.isfinite(ref) & np.isfinite(got)
        if not finite.all():
            same = (ref == got) | (np.isnan(ref) & np.isnan(got))
            if (~finite & ~same).any():
                self.noise = self.max_abs = float("inf")
            ref, got = np.where(finite, ref, 0.0), np.where(finite, got, 0.0)
        self.signal += float(np.sum(ref ** 2))
        self.noise += float(np.sum((ref - got) ** 2))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(ref - got)))) if ref.size else self.max_abs
        a, b = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        self.cosine_sum += float(np.sum(np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-300), 1.0)))
        self.count += len(ref)
        if ref.ndim >= 2 and ref.shape[-1] >= 2:
            self.classifier = True
            self.agree += int(np.sum(ref.argmax(-1) == got.argmax(-1)))
            self.positions += int(np.prod(ref.shape[:-1]))

    def result(self, name: str) -> dict:
        if self.noise == 0 or np.isinf(self.noise):
            sqnr = float("inf") if self.noise == 0 else float("-inf")
        else:
            sqnr = 10 * np.log10(max(self.signal, 1e-30) / self.noise)
        out = {"name": name, "sqnr_db": float(sqnr), "cosine": self.cosine_sum / max(self.count, 1),
               "max_abs_error": self.max_abs}
        if not self.count and self.skipped:
            out["skipped"] = self.skipped
        if self.classifier:
            out["top1_agreement"] = self.agree / max(self.positions, 1)
        return out


@dataclass
class Comparison:
    reference: str
    candidate: str
    samples: int
    outputs: list[dict]
    worst_layers: list[dict]
    latency: RatioEstimate
    file_bytes: dict[str, int]
    skipped: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def latency_ms(self) -> dict[str, float]:
        return {"reference": self.latency.reference_ms, "candidate": self.latency.candidate_ms}

    @property
    def latency_ratio(self) -> float:
        return self.latency.ratio

    def to_dict(self) -> dict:
        out = asdict(self)
        out["latency_ms"] = self.latency_ms
        out["latency_ratio"] = self.latency_ratio
        out["latency_ratio_interval"] = [self.latency.low, self.latency.high]
        out["size_ratio"] = self.file_bytes["candidate"] / max(self.file_bytes["reference"], 1)
        out["passed"] = not self.failures
        return out


def compare_models(reference: str | os.PathLike, candidate: str | os.PathLike, data: str | os.PathLike, *,
                   samples: int = 0, batch_size: int = 32, worst: int = 5, repeats: int = 20, threads: int = 0,
                   latency_width: float = WIDTH, latency_seconds: float = MAX_SECONDS,
                   gates: GateOptions = GateOptions(), inputs: InputOptions = InputOptions()) -> Comparison:
    """Run both models on ``data`` (an .npz with one array per input) and compare them; latency as
    onnxflex.timing measures it (at least ``repeats`` rounds, until the ratio's interval is within
    ``latency_width`` or ``latency_seconds`` have passed). ``inputs``: --batch-axis and --fix-input, read
    as quantize reads them."""
    ref_model, cand_model = load_model(reference), load_model(candidate)
    feeds = _load_feeds(data, ref_model, cand_model, samples, inputs)
    n = feeds.num_samples
    batch = fixed_batch(ref_model) or fixed_batch(cand_model) or batch_size
    outputs = _output_pairs(ref_model, cand_model)
    # Outputs come from the models as they are: a probe output can keep onnxruntime from fusing a layer.
    stats = _run_pair(ref_model, cand_model, list(outputs), list(outputs.values()), feeds, batch, threads)
    shared = _shared_tensors(ref_model, cand_model, set(outputs) | set(outputs.values())) if worst else []
    if shared:
        ref_probed, cand_probed = with_probes(ref_model, shared)[0], with_probes(cand_model, shared)[0]
        stats.update(_run_pair(ref_probed, cand_probed, shared, shared, feeds, batch, threads))
    produced_by = {o: node for node in ref_model.graph.node for o in node.output}
    layers, skipped = [], []
    for name in list(outputs) + shared:
        if not stats[name].count and stats[name].skipped:
            skipped.append({"name": name, "reason": stats[name].skipped})
    for name in shared:
        row = stats[name].result(name)
        row.pop("top1_agreement", None)
        if "skipped" in row:
            continue
        node = produced_by[name]
        layers.append({**row, "node": node.name, "op_type": node.op_type})
    layers.sort(key=lambda r: r["sqnr_db"])
    latency = _time_pair(ref_model, cand_model, feeds.feeds(0, batch), threads, repeats, latency_width,
                         latency_seconds)
    result = Comparison(str(reference), str(candidate), n, [stats[o].result(o) for o in outputs],
                        layers[:worst], latency, {"reference": model_bytes(reference),
                                                  "candidate": model_bytes(candidate)}, skipped)
    result.failures, result.notes = gate_failures(result, gates)
    return result


def _time_pair(ref_model, cand_model, feed: dict, threads: int, min_rounds: int, width: float,
               seconds: float) -> RatioEstimate:
    """Both models on one batch, in one onnxruntime session each (warmed up), in interleaved rounds."""
    ref_sess, cand_sess = timing_sessions([ref_model, cand_model], feed, threads)
    return measure_ratio(lambda: ref_sess.run(None, feed), lambda: cand_sess.run(None, feed),
                         min_rounds=max(min_rounds, 2), width=width, max_seconds=seconds)


def _run_pair(ref_model, cand_model, ref_names: list[str], cand_names: list[str], data: CalibrationSet, batch: int,
              threads: int) -> dict[str, _Stats]:
    """Statistics of candidate tensor ``cand_names[i]`` against reference tensor ``ref_names[i]``, both
    sample-major (batch axes found on the reference, probes.tensor_layout; a shared tensor, or one whose
    samples are folded into another axis, counts as one sample per batch)."""
    ref_sess, cand_sess = session(ref_model, PROVIDERS, threads), session(cand_model, PROVIDERS, threads)
    layout = tensor_layout(ref_sess, ref_names, data, fixed_batch(ref_model), folded_as_shared=True)
    stats = {name: _Stats() for name in ref_names}
    for chunk in data.batches(batch):
        for name, r, c in zip(ref_names, ref_sess.run(ref_names, chunk), cand_sess.run(cand_names, chunk)):
            if layout.shared(name):
                stats[name].add(r[None], c[None])
            else:
                stats[name].add(layout.to_samples(name, r), layout.to_samples(name, c))
    return stats


def _load_feeds(data, ref_model, cand_model, samples: int, inputs: InputOptions) -> CalibrationSet:
    names = graph_input_names(ref_model)
    cand = graph_input_names(cand_model)
    # an input the candidate declares with a default (pinned by --fix-input) is still fed when given
    defaulted = {i.name for i in cand_model.graph.input} - set(cand)
    if not set(cand) <= set(names) <= set(cand) | defaulted:
        raise ModelLoadError(f"the models have different inputs: {names} vs {cand}")
    path = Path(data)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise CalibrationError(f"evaluation data {str(path)!r} {what}; pass --data FILE.npz")
    checked = check_calibration(read_npz(path, set(names)), ref_model, str(path), inputs)
    return checked.take(0, samples or checked.num_samples)


def _output_pairs(ref_model, cand_model) -> dict[str, str]:
    """Reference output name → candidate output name: by name, else by position."""
    ref = [o.name for o in ref_model.graph.output]
    cand = [o.name for o in cand_model.graph.output]
    if len(ref) != len(cand):
        raise ModelLoadError(f"the models have different outputs: {ref} vs {cand}")
    return {r: r for r in ref} if set(ref) == set(cand) else dict(zip(ref, cand))


def _shared_tensors(ref_model, cand_model, skip: set[str]) -> list[str]:
    """Float tensors produced by nodes of both models under the same name, in the reference's order."""
    cand_produced = {o for node in cand_model.graph.node for o in node.output}
    typed = {vi.name: vi.type.tensor_type.elem_type for m in (ref_model, cand_model)
             for vi in list(m.graph.value_info) + list(m.graph.output)}
    names = []
    for node in ref_model.graph.node:
        for o in node.output:
            if o and o in cand_produced and o not in skip and typed.get(o, onnx.TensorProto.FLOAT) in NUMPY_FLOAT_TYPES:
                names.append(o)
    return names


def model_bytes(path: str | os.PathLike) -> int:
    """Size of the model file plus the external data files it references."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations
                                     if (path.parent / loc).is_file())


def gate_failures(result: Comparison, gates: GateOptions) -> tuple[list[str], list[str]]:
    """(one line per gate that does not hold, notes on gates that hold only because they cannot tell)."""
    failures, notes = [], []
    for out in result.outputs:
        if "skipped" in out:
            if gates.min_sqnr is not None or gates.min_agreement is not None:
                notes.append(f"output {out['name']!r} is {out['skipped']}: no gate applies to it")
            continue
        if gates.min_sqnr is not None and out["sqnr_db"] < gates.min_sqnr:
            failures.append(f"output {out['name']!r} SQNR {out['sqnr_db']:.2f} dB < {gates.min_sqnr:g} dB")
        agreement = out.get("top1_agreement")
        if gates.min_agreement is not None and agreement is not None and agreement < gates.min_agreement:
            failures.append(f"output {out['name']!r} top-1 agreement {agreement:.4f} < {gates.min_agreement:g}")
    if gates.min_agreement is not None and not any("top1_agreement" in o for o in result.outputs):
        failures.append("--min-agreement was given but no output is classifier-shaped (float, last axis >= 2)")
    if gates.max_latency_ratio is not None:
        failure, note = ratio_gate(result.latency, gates.max_latency_ratio)
        failures += [failure] if failure else []
        notes += [note] if note else []
    return failures, notes


def format_comparison(result: Comparison) -> str:
    """The report, figures labelled, models in argument order (reference, then candidate)."""
    lines = [f"reference: {result.reference}", f"candidate: {result.candidate}", f"samples: {result.samples}"]
    for out in result.outputs:
        if "skipped" in out:
            lines.append(f"output {out['name']}: skipped ({out['skipped']})")
            continue
        agreement = f", top-1 agreement {out['top1_agreement']:.2%}" if "top1_agreement" in out else ""
        lines.append(f"output {out['name']}: SQNR {out['sqnr_db']:.2f} dB, cosine {out['cosine']:.5f}, "
                     f"max abs error {out['max_abs_error']:.4g}{agreement}")
    if result.worst_layers:
        lines.append("worst intermediate tensors by SQNR:")
        lines += [f"  {r['sqnr_db']:8.2f} dB  {r['name']} ({r['op_type']} {r['node']!r})" for r in result.worst_layers]
    inner = [s["name"] for s in result.skipped if s["name"] not in {o["name"] for o in result.outputs}]
    if inner:
        reasons = sorted({s["reason"] for s in result.skipped if s["name"] in inner})
        lines.append(f"skipped {len(inner)} intermediate tensor(s) ({', '.join(reasons)}): "
                     + ", ".join(inner[:5]) + (", ..." if len(inner) > 5 else ""))
    t, size = result.latency, result.file_bytes
    lines.append(f"latency: reference {t.reference_ms:.3f} ms, candidate {t.candidate_ms:.3f} ms, ratio "
                 f"{t.ratio:.3f} (95% interval {t.low:.3f}-{t.high:.3f}, {t.rounds} interleaved rounds in "
                 f"{t.seconds:.1f} s{'' if t.converged else ', stopped before reaching ±' + format(t.width, '.0%')})")
    lines.append(f"file size: reference {size['reference']:,} B, candidate {size['candidate']:,} B, ratio "
                 f"{size['candidate'] / max(size['reference'], 1):.3f}")
    lines += [f"note: {note}" for note in result.notes]
    lines.append("gates: " + ("; ".join(result.failures) if result.failures else "all passed"))
    return "\n".join(lines)
