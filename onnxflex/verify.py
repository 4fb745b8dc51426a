"""Checks every emitted model passes: onnx.checker, loads and runs in onnxruntime, matches the torch
simulation of the same quantized model, and its SQNR against the FP32 model."""
from __future__ import annotations

import collections
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from onnxflex.calib import fixed_batch
from onnxflex.capture import remove_runtime_file, runtime_file, session, session_options
from onnxflex.extdata import needs_file
from onnxflex.errors import VerificationError
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


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], providers, batch: int = 64) -> dict[str, np.ndarray]:
    """All outputs of ``model`` over ``feeds``, run in batches (of the model's fixed batch, if it has one)."""
    batch = fixed_batch(model) or batch
    sess = session(model, list(providers))
    names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(feeds.values())))
    chunks = [sess.run(names, {k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
    return {name: np.concatenate([c[j] for c in chunks]) for j, name in enumerate(names)}


def optimized_op_counts(model: onnx.ModelProto, providers=("CPUExecutionProvider",)) -> dict[str, int]:
    """Op types of the graph onnxruntime actually runs after its optimisations (fused kernels show here),
    with the session options onnxflex runs models with (capture.session_options)."""
    with tempfile.TemporaryDirectory(prefix="onnxflex-opt-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = session_options()
        opts.optimized_model_filepath = path
        if needs_file(model):
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          "optimized.onnx.data")
        session(model, list(providers), opts=opts)
        optimized = onnx.load(path, load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in optimized.graph.node).items()))


def verify(qmodel: onnx.ModelProto, fp_model: onnx.ModelProto | dict[str, np.ndarray], feeds: dict[str, np.ndarray],
           simulated: dict[str, np.ndarray], providers, min_sim_sqnr_db: float) -> Verification:
    """Raises VerificationError when the checker fails or onnxruntime disagrees with the simulation.
    ``fp_model`` is the FP32 model, or its outputs on ``feeds`` computed beforehand."""
    check_model(qmodel)
    try:
        quantized = run(qmodel, feeds, providers)
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot run the emitted model: {exc}") from exc
    reference = fp_model if isinstance(fp_model, dict) else run(fp_model, feeds, providers)
    sim = {k: sqnr_db(quantized[k], simulated[k]) for k in quantized if k in simulated}
    bad = {k: v for k, v in sim.items() if v < min_sim_sqnr_db}
    if bad:
        raise VerificationError(
            f"onnxruntime's outputs of the emitted model differ from onnxflex's simulation: SQNR "
            f"{', '.join(f'{k} {v:.1f} dB' for k, v in bad.items())} < {min_sim_sqnr_db} dB; this is a bug, "
            "please report it with the model")
    fp32 = {k: sqnr_db(reference[k], quantized[k]) for k in quantized if k in reference}
    return Verification(len(next(iter(feeds.values()))), sim, fp32, optimized_op_counts(qmodel))
