"""The Python API: ``onnxflex.quantize(model, calibration, config) -> QuantResult``."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxflex.config import QuantConfig
from onnxflex.errors import VerificationError
from onnxflex.graph import copy_file_atomic, save_model_atomic, write_text_atomic
from onnxflex.progress import Progress
from onnxflex.report import build_report, to_json
from onnxflex.text import TOKENIZER_FILES, genai_config, genai_config_path

log = logging.getLogger("onnxflex")


@dataclass
class QuantResult:
    """The quantized model, its report (a JSON-ready dict) and the exported parameters."""

    model: onnx.ModelProto
    report: dict[str, Any]
    params: Any = field(repr=False, default=None)
    source: Path | None = None  # the input model's path, when it was given as one

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model and ``<path>.report.json`` atomically, and a copy of the genai_config.json
        beside the input model (keep_genai_config); returns the model path."""
        path = save_model_atomic(self.model, path)
        write_text_atomic(to_json(self.report), report_path(path))
        if self.source is not None:
            keep_genai_config(self.source, path)
        return path


def keep_genai_config(source: Path, output: Path) -> Path | None:
    """Copy the onnxruntime-genai genai_config.json beside ``source`` next to ``output``, its
    model.decoder.filename naming ``output``, so that onnxruntime-genai loads the quantized model from
    that folder. One already there that differs is kept, with a warning; returns the copy's path."""
    config = genai_config(source)
    if not config:
        return None
    decoder = config.get("model", {}).get("decoder")
    if isinstance(decoder, dict) and decoder.get("filename", output.name) != output.name:
        decoder["filename"] = output.name
    text = json.dumps(config, indent=4) + "\n"
    target = genai_config_path(output)
    if target.exists() and target.read_text() != text:
        log.warning("%s is kept as it is (not replaced by the input's genai_config.json naming %s): onnxruntime-genai "
                    "loads what it names from that folder; write the quantized model to a folder of its own to get "
                    "a genai_config.json for it", target, output.name)
        return None
    written = write_text_atomic(text, target)
    keep_tokenizer_files(source, output)
    return written


def keep_tokenizer_files(source: Path, output: Path) -> list[Path]:
    """Copy the tokenizer files onnxruntime-genai reads (TOKENIZER_FILES) from beside ``source`` next to
    ``output``, so that its Tokenizer opens the quantized model's folder too; a file already there is
    left alone (the same one, or the user's). Returns the copies made."""
    copies = []
    for name in TOKENIZER_FILES:
        origin, target = Path(source).with_name(name), Path(output).with_name(name)
        if origin.is_file() and not target.exists():
            copies.append(copy_file_atomic(origin, target))
    return copies


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
    source = Path(model) if isinstance(model, (str, os.PathLike)) else None
    result = QuantResult(run.model, build_report(run, logged, time.perf_counter() - t0), run.params, source)
    failure = run.verification.failure() if run.verification is not None else None
    if failure:
        raise VerificationError(f"{failure}; the simulation, or the place it is compared, is wrong: please report "
                                "it with the model", result)
    return result
