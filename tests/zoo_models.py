"""The zoo: small models written by the exporters users bring (torch.onnx, paddle2onnx, tf2onnx, ...),
committed under tests/zoo/ with the scripts that made them, so that no exporter is needed to test.

Each ``tests/zoo/*.json`` manifest lists models::

    {"models": [{"name": "bert_tiny", "file": "bert_tiny.onnx", "exporter": "torch.onnx 2.13.0 (dynamo)",
                 "script": "make_torch_zoo.py", "transformer": true,
                 "inputs": {"input_ids": {"kind": "tokens", "shape": [16], "high": 1000, "dtype": "int64"},
                            "state": {"kind": "zeros", "shape": [2, 128], "batch_axis": 1},
                            "sr": {"kind": "fixed", "value": 16000, "dtype": "int64"}},
                 "fix_inputs": {"sr": 16000}, "notes": "..."}]}

``shape`` is one sample's shape, without the sample axis; ``batch_axis`` (default 0) is where the
samples go in the model's layout. Kinds: normal (``scale``, default 1), uniform (``low``, ``high``),
tokens (integers in [0, ``high``)), ones, zeros, arange (each sample holds ``start``, ``start`` + 1, ...
along its last axis: a decoder's position ids after ``start`` past tokens), fixed (one ``value``
shared by every sample: the array is 0-d, or ``shape`` if given, and has no sample axis).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ZOO = Path(__file__).parent / "zoo"


@dataclass(frozen=True)
class ZooModel:
    name: str
    path: Path
    exporter: str
    inputs: dict[str, dict[str, Any]]
    transformer: bool = False
    fix_inputs: dict[str, float] = field(default_factory=dict)
    notes: str = ""

    @property
    def batch_axes(self) -> dict[str, int]:
        return {k: v["batch_axis"] for k, v in self.inputs.items() if v.get("batch_axis", 0)}

    def feeds(self, samples: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Calibration/eval arrays in the model's own layout: samples on each input's batch axis."""
        rng = np.random.default_rng(seed)
        return {name: _make(spec, samples, rng) for name, spec in self.inputs.items()}


def _make(spec: dict[str, Any], samples: int, rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(spec.get("dtype", "float32"))
    kind = spec["kind"]
    if kind == "fixed":
        return np.full(spec.get("shape", []), spec["value"], dtype)
    shape = [samples, *spec["shape"]]
    if kind == "normal":
        value = rng.standard_normal(shape) * spec.get("scale", 1.0)
    elif kind == "uniform":
        value = rng.uniform(spec.get("low", 0.0), spec.get("high", 1.0), shape)
    elif kind == "tokens":
        value = rng.integers(0, spec["high"], shape)
    elif kind == "arange":
        value = np.broadcast_to(spec.get("start", 0) + np.arange(shape[-1]), shape)
    elif kind in ("ones", "zeros"):
        value = np.ones(shape) if kind == "ones" else np.zeros(shape)
    else:
        raise ValueError(f"unknown input kind {kind!r} in the zoo manifest")
    return np.moveaxis(value.astype(dtype), 0, spec.get("batch_axis", 0))


def zoo_models() -> list[ZooModel]:
    models = []
    for manifest in sorted(ZOO.glob("*.json")):
        for entry in json.loads(manifest.read_text())["models"]:
            models.append(ZooModel(entry["name"], ZOO / entry["file"], entry["exporter"], entry["inputs"],
                                   entry.get("transformer", False), entry.get("fix_inputs", {}),
                                   entry.get("notes", "")))
    return models
