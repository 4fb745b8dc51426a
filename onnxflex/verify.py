"""Checks every emitted model passes: onnx.checker, loads and runs in onnxruntime, matches the torch
simulation of the same quantized model, and its SQNR against the FP32 model."""
from __future__ import annotations

import collections
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxflex.calib import CalibrationSet, fixed_batch
from onnxflex.extdata import needs_file
from onnxflex.graph import all_nodes
from onnxflex.errors import VerificationError
from onnxflex.layout import Layout
from onnxflex.ort import remove_runtime_file, runtime_file, session, session_options
from onnxflex.probes import tensor_layout
from onnxflex.qparams import sqnr_db


@dataclass(frozen=True)
class Verification:
    """``sim_sqnr_db``: per graph output, onnxruntime's run of the emitted model against the simulation,
    measured at ``compared_at[output]`` where that names another tensor (a Softmax output is compared at
    its input, divergence.COMPARED_AT_INPUT); ``divergence``: divergence.Divergence.to_dict() of a
    failed run, naming the first block where the two part."""

    samples: int
    sim_sqnr_db: dict[str, float]
    fp32_sqnr_db: dict[str, float]
    optimized_ops: dict[str, int]
    tolerance_db: float = 0.0
    compared_at: dict[str, str] = field(default_factory=dict)
    divergence: dict | None = None
    divergence_summary: str = ""
    blocks_agree: bool = False

    @property
    def below_tolerance(self) -> dict[str, float]:
        return {k: v for k, v in self.sim_sqnr_db.items() if v < self.tolerance_db}

    def failure(self) -> str | None:
        """The one-line reason this verification fails, None when it passes. Outputs below the tolerance
        fail it unless every block, fed onnxruntime's values of its inputs, agrees with onnxruntime
        (``blocks_agree``, from divergence.locate): then each block is simulated right and what differs
        is rounding flips carried and amplified from block to block (see chained_warning)."""
        if not self.below_tolerance or self.blocks_agree:
            return None
        return (f"onnxruntime's outputs of the emitted model differ from onnxflex's simulation: SQNR "
                f"{self._where()} < {self.tolerance_db} dB"
                + (f"; {self.divergence_summary}" if self.divergence_summary else ""))

    def chained_warning(self) -> str | None:
        """The warning of a model whose outputs are below the tolerance while every block agrees."""
        if not self.below_tolerance or not self.blocks_agree:
            return None
        return (f"onnxruntime's outputs of the emitted model differ from onnxflex's simulation by SQNR "
                f"{self._where()} < {self.tolerance_db} dB, but every block fed onnxruntime's inputs agrees "
                f"with onnxruntime within it: the difference is rounding flips near a level boundary, carried "
                f"and amplified from block to block, not a wrong simulation; the model is kept (its SQNR "
                "against FP32 is what tells its quality)")

    def _where(self) -> str:
        return ", ".join(f"{k}{f' (at {self.compared_at[k]})' if k in self.compared_at else ''} {v:.1f} dB"
                         for k, v in self.below_tolerance.items())

    def to_dict(self) -> dict:
        out = {"samples": self.samples, "onnxruntime_vs_simulation_sqnr_db": self.sim_sqnr_db,
               "quantized_vs_fp32_sqnr_db": self.fp32_sqnr_db, "optimized_graph_ops": self.optimized_ops,
               "tolerance_db": self.tolerance_db, "passed": self.failure() is None}
        if self.compared_at:
            out["simulation_compared_at"] = self.compared_at
        if self.divergence is not None:
            out["divergence"] = self.divergence
        return out


def check_model(model: onnx.ModelProto) -> None:
    try:
        if needs_file(model):  # the checker takes a path for models whose weights are external data
            path = runtime_file(model)
            try:
                onnx.checker.check_model(str(path), full_check=True)
            finally:
                remove_runtime_file(path)
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise VerificationError(f"the emitted model fails onnx.checker: {exc}") from exc


def run(model: onnx.ModelProto, data: CalibrationSet, providers, batch: int = 64,
        layout: Layout | None = None) -> dict[str, np.ndarray]:
    """All outputs of ``model`` over ``data``, run in batches (of the model's fixed batch, if it has one),
    each sample-major (``layout`` gives their batch axes [default: found by probes.tensor_layout]; a
    shared output once)."""
    fixed = fixed_batch(model)
    sess = session(model, list(providers))
    names = [o.name for o in sess.get_outputs()]
    layout = layout or tensor_layout(sess, names, data, fixed)
    chunks = [sess.run(names, feeds) for feeds in data.batches(fixed or batch)]
    return {name: chunks[0][j] if layout.shared(name) else
            np.concatenate([layout.to_samples(name, c[j]) for c in chunks]) for j, name in enumerate(names)}


def optimized_op_counts(model: onnx.ModelProto, providers=("CPUExecutionProvider",)) -> dict[str, int]:
    """Op types of the graph onnxruntime actually runs after its optimisations (fused kernels show here),
    with the session options onnxflex runs models with (ort.session_options); the nodes of If
    branches and Loop/Scan bodies count too (the optimised file keeps them in the node attributes)."""
    with tempfile.TemporaryDirectory(prefix="onnxflex-opt-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = session_options(optimized_path=path)
        if needs_file(model):
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          "optimized.onnx.data")
        session(model, list(providers), opts=opts)
        optimized = onnx.load(path, load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in all_nodes(optimized.graph)).items()))


def verify(qmodel: onnx.ModelProto, fp_model: onnx.ModelProto | dict[str, np.ndarray], data: CalibrationSet,
           simulated: dict[str, np.ndarray], providers, min_sim_sqnr_db: float,
           layout: Layout | None = None, compared_at: dict[str, str] | None = None) -> Verification:
    """Raises VerificationError when the checker fails or onnxruntime cannot run the model; a model whose
    onnxruntime outputs disagree with the simulation is returned with ``failure()`` set (the caller
    decides what becomes of it). ``fp_model`` is the FP32 model, or its outputs on ``data`` computed
    beforehand; outputs are compared sample-major (``layout``: the outputs' batch axes, as for run).
    ``compared_at``: graph output → the tensor of the emitted model compared with ``simulated`` in its
    place (``simulated`` holds that tensor, with the output's batch axis); FP32 is always compared at
    the outputs."""
    from onnxflex.divergence import with_probes

    check_model(qmodel)
    compared_at = {o: t for o, t in (compared_at or {}).items() if t in simulated}
    probed, probes = with_probes(qmodel, list(compared_at.values()))
    compared_at = {o: t for o, t in compared_at.items() if t in probes}
    probe_layout = layout.merged({t: layout.axis(o) for o, t in compared_at.items()}) if layout else None
    try:
        quantized = run(qmodel, data, providers, layout=layout)
        # a separate run: an exposed tensor may keep onnxruntime from fusing its producer, and the
        # outputs (compared with FP32 too) must be those of the model as written
        values = run(probed, data, providers, layout=probe_layout) if compared_at else {}
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot run the emitted model: {exc}") from exc
    ort_at = {o: probes[t].value(values[probes[t].output]) for o, t in compared_at.items()}
    reference = fp_model if isinstance(fp_model, dict) else run(fp_model, data, providers, layout=layout)
    sim = {k: sqnr_db(ort_at[k], simulated[compared_at[k]]) if k in compared_at else sqnr_db(quantized[k], simulated[k])
           for k in quantized if k in simulated}
    fp32 = {k: sqnr_db(reference[k], quantized[k]) for k in quantized if k in reference}
    return Verification(data.num_samples, sim, fp32, optimized_op_counts(qmodel), min_sim_sqnr_db, compared_at)
