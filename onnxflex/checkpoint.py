"""Resumable reconstruction: each finished block's learned state, saved atomically in ``checkpoint_dir``.

The folder holds ``fingerprint.json`` (hashes of the canonical model, the config and the calibration
data) and one ``blockNNNN.pt`` per finished block: its exported weight integers and scales, its
activation quantizers' state and its BlockResult. A run restarted with the same arguments restores the
finished blocks (recomputing their quantized outputs for the next block) and continues at the first
missing one; a folder written for another model, config or data set is refused.

A finished block's rounders are replaced by ``rounders.FrozenRounder`` in the uninterrupted run as
well, so that both runs compute every later block from the same integers and write the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch
from onnx.external_data_helper import uses_external_data

from onnxflex.errors import ConfigError
from onnxflex.extdata import WEIGHTS_DIR_KEY, external_chunks, weights_dir
from onnxflex.graph import _write_atomic
from onnxflex.qparams import QuantizedWeight

FINGERPRINT = "fingerprint.json"
_CHUNK = 16 << 20
RUN_ONLY = frozenset({"checkpoint_dir", "workers", "ray_address"})  # options that leave the result as it is


class Checkpoint:
    """The block files of one run in ``folder``; opening checks (or writes) the run's fingerprint."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / FINGERPRINT
        if meta.is_file():
            saved = json.loads(meta.read_text())
            differs = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
            if differs:
                raise ConfigError(
                    f"checkpoint_dir={str(self.folder)!r} holds a checkpoint of a different run (its "
                    f"{', '.join(differs)} differ{'s' if len(differs) == 1 else ''}); resume with the same model, "
                    "options and calibration data, or pass an empty --checkpoint-dir")
        else:
            _write_atomic(meta, lambda tmp: Path(tmp).write_text(json.dumps(fingerprint, indent=2) + "\n"))

    def path(self, index: int) -> Path:
        return self.folder / f"block{index:04d}.pt"

    def load(self, index: int, block_name: str) -> dict[str, Any] | None:
        """The saved state of block ``index``, or None when it has not finished yet."""
        path = self.path(index)
        if not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["block"] != block_name:
            raise ConfigError(f"checkpoint file {str(path)!r} belongs to block {saved['block']!r}, not "
                              f"{block_name!r}; pass an empty --checkpoint-dir")
        saved["weights"] = {name: QuantizedWeight(w["ints"].numpy(), w["scale"].numpy(), w["zero_point"].numpy(),
                                                  int(w["axis"]), int(w["bits"]), int(w.get("block_size", 0)))
                            for name, w in saved["weights"].items()}
        return saved

    def save(self, index: int, block_name: str, result: Any, weights: dict[str, QuantizedWeight],
             acts: dict[str, torch.nn.Module], biases: dict[str, torch.Tensor] | None = None) -> None:
        """Writes block ``index``'s file atomically: its result, weights, activation quantizers and the
        float values of the biases its rounding corrected (``biases``)."""
        state = {
            "block": block_name,
            "result": asdict(result),
            "weights": {name: {"ints": torch.from_numpy(np.ascontiguousarray(w.ints)),
                               "scale": torch.from_numpy(np.ascontiguousarray(w.scale)),
                               "zero_point": torch.from_numpy(np.ascontiguousarray(w.zero_point)),
                               "axis": int(w.axis), "bits": int(w.bits), "block_size": int(w.block_size)}
                        for name, w in weights.items()},
            "acts": act_states(acts),
            "biases": {name: value.detach().cpu() for name, value in (biases or {}).items()},
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write_atomic(self.path(index), lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def act_states(acts: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """Activation quantizers as a block file keeps them (and ``load`` returns them): name → its state
    dict on the CPU and whether it is enabled."""
    return {name: {"state": {k: v.detach().cpu() for k, v in act.state_dict().items()},
                   "enabled": bool(getattr(act, "enabled", True))} for name, act in acts.items()}


def fingerprint(model: onnx.ModelProto, config_values: dict[str, Any], datasets: Iterable[Any]) -> dict[str, str]:
    """Hashes of what decides a run's result: the model (graph and every weight byte), the config
    (``checkpoint_dir`` itself and the worker options, which do not change the result, excluded) and the
    calibration arrays (names, shapes, dtypes, values)."""
    values = {k: v for k, v in config_values.items() if k not in RUN_ONLY}
    return {"model": _model_hash(model),
            "config": hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest(),
            "calibration data": _data_hash(datasets)}


def _model_hash(model: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    for prop in model.metadata_props:
        if prop.key != WEIGHTS_DIR_KEY:
            h.update(prop.SerializeToString())
    for opset in model.opset_import:
        h.update(opset.SerializeToString())
    g = model.graph
    for part in (g.node, g.input, g.output):
        for item in part:
            h.update(item.SerializeToString())
    folder = weights_dir(model)
    for tensor in g.initializer:
        if not uses_external_data(tensor):
            h.update(tensor.SerializeToString())
            continue
        h.update(tensor.name.encode() + repr(list(tensor.dims)).encode())
        for chunk in external_chunks(tensor, folder):
            h.update(chunk)
    return h.hexdigest()


def _data_hash(datasets: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for arrays in datasets:
        for name in sorted(arrays):
            array = arrays[name]
            h.update(f"{name}:{tuple(array.shape)}:{np.dtype(array.dtype).str}".encode())
            rows = max(1, _CHUNK // max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize))
            for start in range(0, array.shape[0], rows):
                h.update(np.ascontiguousarray(array[start:start + rows]).tobytes())
    return h.hexdigest()


__all__ = ["Checkpoint", "act_states", "fingerprint"]
