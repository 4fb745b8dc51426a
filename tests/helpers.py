"""Helpers the tests import (tests/ is on pytest's pythonpath)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CNN = MODELS / "digits_cnn.onnx"


def run_model(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Share of the rows whose argmax is ``reference``'s (the quantized model's decisions against FP32's)."""
    return float((logits.argmax(-1) == reference.argmax(-1)).mean())


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((logits.argmax(axis=1) == labels).mean())


