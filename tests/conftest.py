"""Shared fixtures: the bundled digits CNN, its data, and quantize runs reused across tests."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnxflex
from onnxflex.config import QuantConfig

from helpers import CNN, MODELS, run_model


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and onnxruntime's CUDA execution provider")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cnn_eval():
    with np.load(MODELS / "digits_cnn.eval.npz") as data:
        return {"input": data["input"], "labels": data["labels"]}


@pytest.fixture(scope="session")
def cnn_fp32_logits(cnn_eval):
    return run_model(CNN, {"input": cnn_eval["input"]})[0]


@pytest.fixture(autouse=True)
def _short_latency_timing(monkeypatch):
    """Quantize runs with held-out samples time the result against FP32 for the report (about 1 s);
    in-process tests take the minimum rounds instead. tests/test_latency_rules.py checks the timing."""
    import onnxflex.speed

    monkeypatch.setattr(onnxflex.speed, "MEASURE_SECONDS", 0.0)


_RUNS: dict[tuple, onnxflex.QuantResult] = {}


@pytest.fixture(scope="session")
def quantized_cnn():
    """``quantized_cnn(**config)`` quantizes the bundled CNN once per distinct config in the session."""

    def run(**options) -> onnxflex.QuantResult:
        key = tuple(sorted(options.items()))
        if key not in _RUNS:
            _RUNS[key] = onnxflex.quantize(CNN, config=QuantConfig(**options), progress=False)
        return _RUNS[key]

    return run
