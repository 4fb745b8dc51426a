"""The Python API: ``onnxflex.quantize(model, calibration, config) -> QuantResult``."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxflex.config import QuantConfig
from onnxflex.errors import VerificationError
from onnxflex.graph import save_model_atomic, write_text_atomic
from onnxflex.progress import Progress
from onnxflex.report import build_report, to_json

log = logging.getLogger("onnxflex")


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


def unverified_path(output: str | os.PathLike) -> Path:
    """Where a model that failed verification is kept instead of ``output``: ``x.onnx`` → ``x.unverified.onnx``."""
    output = Path(output)
    stem = output.name[:-len(".onnx")] if output.name.endswith(".onnx") else output.name
    return output.with_name(f"{stem}.unverified.onnx")


def quantize(model: Any, calibration: Any = None, config: QuantConfig | None = None, *,
             progress: bool = True) -> QuantResult:
    """Quantize ``model`` (path or ModelProto) with ``calibration`` (any source onnxflex.sources accepts:
    .npz, folder, ImageFolder, mapping, CalibrationDataReader, iterable of feed dicts; None = the bundled
    data or synthetic inputs); see QuantConfig for the options.

    Raises VerificationError when onnxruntime's outputs of the emitted model differ from the simulation
    by more than ``config.verify_tolerance_db``; the error's ``result`` is the finished QuantResult (its
    report's "verification" names the first diverging block), which ``result.save`` still writes."""
    with _WarningLog() as logged:
        return _quantize(model, calibration, config or QuantConfig(), progress, logged)


class _WarningLog(logging.Handler):
    """Collects every warning the onnxflex logger emits during a run, so that the report holds each one
    that went to stderr (from any stage), not only those a stage hands back."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.restore: list[tuple[logging.Handler | logging.Logger, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        shown = log.getEffectiveLevel()
        if shown > logging.WARNING:  # --quiet: warnings are still made (and kept), stderr still shows none
            self.restore.append((log, log.level))
            for handler in logging.getLogger().handlers:
                self.restore.append((handler, handler.level))
                handler.setLevel(max(handler.level, shown))
            log.setLevel(logging.WARNING)
        log.addHandler(self)
        return self.messages

    def __exit__(self, *exc) -> None:
        log.removeHandler(self)
        for owner, level in reversed(self.restore):
            owner.setLevel(level)


def _quantize(model: Any, calibration: Any, config: QuantConfig, progress: bool, logged: list[str]) -> QuantResult:
    from onnxflex.pipeline import run_pipeline

    t0 = time.perf_counter()
    run = run_pipeline(model, calibration, config, Progress(progress))
    result = QuantResult(run.model, build_report(run, logged, time.perf_counter() - t0), run.params)
    failure = run.verification.failure() if run.verification is not None else None
    if failure:
        raise VerificationError(f"{failure}; the simulation, or the place it is compared, is wrong: please report "
                                "it with the model", result)
    return result
