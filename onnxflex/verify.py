"""Checks every emitted model passes: onnx.checker, loads and runs in onnxruntime, matches the torch
simulation of the same quantized model, and its SQNR against the FP32 model."""
from __future__ import annotations

import collections
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from onnxflex.calib import CalibrationSet, fixed_batch
from onnxflex.capture import remove_runtime_file, runtime_file, session, session_options, tensor_layout
from onnxflex.extdata import needs_file
from onnxflex.graph import all_nodes
from onnxflex.errors import VerificationError
from onnxflex.layout import Layout
from onnxflex.qparams import sqnr_db


@dataclass(frozen=True)
class Verification:
    samples: int
    sim_sqnr_db: dict[str, float]
    fp32_sqnr_db: dict[str, float]
    optimized_ops: dict[str, int]

    def to_dict(self) -> dict:
        return {"samples": self.samples, "onnxruntime_vs_simulation_sqnr_db": self.sim_sqnr_db,
                "quantized_vs_fp32_sqnr_db": self.fp32_sqnr_db, "optimized_graph_ops": self.optimized_ops}


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
    each sample-major (``layout`` gives their batch axes [default: found by capture.tensor_layout]; a
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
    with the session options onnxflex runs models with (capture.session_options); the nodes of If
    branches and Loop/Scan bodies count too (the optimised file keeps them in the node attributes)."""
    with tempfile.TemporaryDirectory(prefix="onnxflex-opt-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = session_options()
        opts.optimized_model_filepath = path
        if needs_file(model):
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          "optimized.onnx.data")
        session(model, list(providers), opts=opts)
        optimized = onnx.load(path, load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in all_nodes(optimized.graph)).items()))


def verify(qmodel: onnx.ModelProto, fp_model: onnx.ModelProto | dict[str, np.ndarray], data: CalibrationSet,
           simulated: dict[str, np.ndarray], providers, min_sim_sqnr_db: float,
           layout: Layout | None = None) -> Verification:
    """Raises VerificationError when the checker fails or onnxruntime disagrees with the simulation.
    ``fp_model`` is the FP32 model, or its outputs on ``data`` computed beforehand; outputs are compared
    sample-major (``layout``: the outputs' batch axes, as for run)."""
    check_model(qmodel)
    try:
        quantized = run(qmodel, data, providers, layout=layout)
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot run the emitted model: {exc}") from exc
    reference = fp_model if isinstance(fp_model, dict) else run(fp_model, data, providers, layout=layout)
    sim = {k: sqnr_db(quantized[k], simulated[k]) for k in quantized if k in simulated}
    bad = {k: v for k, v in sim.items() if v < min_sim_sqnr_db}
    if bad:
        raise VerificationError(
            f"onnxruntime's outputs of the emitted model differ from onnxflex's simulation: SQNR "
            f"{', '.join(f'{k} {v:.1f} dB' for k, v in bad.items())} < {min_sim_sqnr_db} dB; this is a bug, "
            "please report it with the model")
    fp32 = {k: sqnr_db(reference[k], quantized[k]) for k in quantized if k in reference}
    return Verification(data.num_samples, sim, fp32, optimized_op_counts(qmodel))
