"""The Python API: ``onnxflex.quantize(model, calibration, config) -> QuantResult``."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from onnxflex.calib import CalibrationSet, check_calibration, default_calibration_path, fixed_batch, load_npz
from onnxflex.config import QuantConfig
from onnxflex.errors import CalibrationError
from onnxflex.graph import load_model, save_model_atomic, write_text_atomic
from onnxflex.progress import Progress
from onnxflex.report import layer_summary, to_json, versions


@dataclass
class QuantResult:
    """The quantized model, its report (a JSON-ready dict) and the exported parameters."""

    model: onnx.ModelProto
    report: dict[str, Any]
    params: Any = field(repr=False, default=None)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model and ``<path>.report.json`` atomically; returns the model path."""
        path = save_model_atomic(self.model, path)
        write_text_atomic(to_json(self.report), report_path(path))
        return path


def report_path(model_path: str | os.PathLike) -> Path:
    return Path(f"{model_path}.report.json")


def resolve_calibration(calibration: Any, model: onnx.ModelProto, model_source: Any) -> CalibrationSet:
    """An .npz path, a CalibrationSet or a {input name: array} mapping; None looks for the bundled
    ``<model>.calib.npz`` beside a model given by path."""
    if calibration is None:
        found = default_calibration_path(model_source) if isinstance(model_source, (str, os.PathLike)) else None
        if found is None:
            raise CalibrationError(
                "no calibration data: pass --calib FILE.npz (one array per model input, samples on dim 0)")
        calibration = found
    if isinstance(calibration, CalibrationSet):
        return check_calibration(calibration.arrays, model, calibration.source)
    if isinstance(calibration, (str, os.PathLike)):
        return load_npz(calibration, model)
    if isinstance(calibration, Mapping):
        return check_calibration({k: np.asarray(v) for k, v in calibration.items()}, model, "calibration mapping")
    raise CalibrationError(f"unsupported calibration source of type {type(calibration).__name__}; "
                           "pass an .npz path or a mapping of input name to array")


def split_calibration(data: CalibrationSet, config: QuantConfig, batch: int | None):
    """(reconstruction set, verification set): the last ``verify_samples`` are held out."""
    n = data.num_samples if not config.calib_samples else min(config.calib_samples, data.num_samples)
    held = min(config.verify_samples, n // 4)
    used = n - held
    if batch:
        used, held = used - used % batch, held - held % batch
    if used < 1:
        raise CalibrationError(f"{data.source}: {n} calibration samples are too few; give at least "
                               f"{max(2, batch or 1) * 2} samples")
    return data.take(0, used), data.take(used, used + held)


def quantize(model: Any, calibration: Any = None, config: QuantConfig | None = None, *,
             progress: bool = True) -> QuantResult:
    """Quantize ``model`` (path or ModelProto) with ``calibration``; see QuantConfig for the options."""
    from onnxflex.pipeline import run_pipeline

    config = config or QuantConfig()
    t0 = time.perf_counter()
    original = load_model(model)
    data = resolve_calibration(calibration, original, model)
    recon, held = split_calibration(data, config, fixed_batch(original))
    qmodel, report, params = run_pipeline(original, recon, held, config, Progress(progress))
    report.update(config=config.to_dict(), versions=versions(), seed=config.seed,
                  calibration={"source": data.source, "reconstruction_samples": recon.num_samples,
                               "verification_samples": held.num_samples},
                  layers=layer_summary(report.pop("_plan"), params, config))
    report["timings"]["total"] = time.perf_counter() - t0
    return QuantResult(qmodel, report, params)
