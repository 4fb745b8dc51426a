"""Frozen, keyword-only, self-validating configuration. The CLI and the API build the same objects."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from onnxflex.errors import ConfigError

METHODS = ("rtn", "flexround")
GRANULARITIES = ("block", "layer")
TARGETS = ("onnxruntime",)
DEVICES = ("auto", "cpu", "cuda")
SCALE_SEARCH = ("minmax", "mse")


def _check_range(name: str, value: Any, lo: float, hi: float, kind: type = int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is out of range: expected {kind.__name__} in [{lo}, {hi}]")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Everything that decides what a quantize run produces.

    wbits: weight bits (2–8; values below 8 live in an int8 container).
    abits: activation bits (8), or 0 for weight-only quantization.
    method: rounding method ('rtn' = round-to-nearest, no learning; 'flexround').
    granularity: reconstruction unit ('block' = between single-tensor cut points, 'layer' = one weighted op).
    iters, batch_size, lr, scale_lr, act_lr: the reconstruction optimiser (Adam + cosine decay).
    weight_scale / act_scale: how initial step sizes are chosen (min/max or an MSE grid search).
    verify_samples: calibration samples held out of reconstruction and used to verify the result.
    max_cache_mb: RAM for captured tensors; beyond it tensors spill to memory-mapped files.
    """

    wbits: int = 8
    abits: int = 8
    method: str = "flexround"
    granularity: str = "block"
    target: str = "onnxruntime"
    iters: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    scale_lr: float = 1e-3
    act_lr: float = 2e-4
    weight_scale: str = "mse"
    act_scale: str = "mse"
    seed: int = 0
    device: str = "auto"
    max_cache_mb: int = 2048
    calib_samples: int = 0
    verify_samples: int = 32
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    verify_tolerance_db: float = 30.0

    def __post_init__(self) -> None:
        _check_range("wbits", self.wbits, 2, 8)
        if self.abits != 0:
            _check_range("abits", self.abits, 8, 8)
        _check_choice("method", self.method, METHODS)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("target", self.target, TARGETS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("weight_scale", self.weight_scale, SCALE_SEARCH)
        _check_choice("act_scale", self.act_scale, SCALE_SEARCH)
        _check_range("iters", self.iters, 0, 1_000_000)
        _check_range("batch_size", self.batch_size, 1, 65536)
        for name in ("lr", "scale_lr", "act_lr"):
            _check_range(name, getattr(self, name), 0.0, 1.0, float)
        _check_range("seed", self.seed, 0, 2**31 - 1)
        _check_range("max_cache_mb", self.max_cache_mb, 1, 1 << 30)
        _check_range("calib_samples", self.calib_samples, 0, 1 << 30)
        _check_range("verify_samples", self.verify_samples, 0, 1 << 20)
        _check_range("verify_tolerance_db", self.verify_tolerance_db, 0.0, 300.0, float)
        for name in ("exclude_nodes", "exclude_op_types"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a tuple of strings, got {value!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "QuantConfig":
        """Build from a mapping; unknown keys are rejected, lists become tuples."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)
