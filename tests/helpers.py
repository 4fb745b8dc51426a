"""Helpers the tests import (tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CNN = MODELS / "digits_cnn.onnx"


def run_cli(*args: str, cwd=ROOT, env: dict[str, str] | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess:
    """``python -m onnxflex.cli ARGS`` in a process of its own (``env``: its whole environment, default
    this one's), its output captured as text."""
    return subprocess.run([sys.executable, "-m", "onnxflex.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


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


