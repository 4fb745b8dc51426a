"""Frozen, keyword-only, self-validating configuration. The CLI and the API build the same objects."""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from onnxflex.errors import ConfigError

METHODS = ("rtn", "flexround", "adaround", "signround")
GRANULARITIES = ("block", "layer")
TARGETS = ("onnxruntime", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
SCALE_SEARCH = ("minmax", "mse")
METHOD_DEFAULT = -1  # iters or lr at -1: the method's own value, resolved when the config is built


def method_iters(method: str) -> int:
    """Reconstruction steps per block when ``iters`` is -1: 400, SignRound 200 (its paper's default)."""
    return 200 if method == "signround" else 400


def method_lr(method: str, iters: int) -> float:
    """The rounding parameters' rate when ``lr`` is -1: Adam's 3e-3 for FlexRound's log-steps, 0.1
    for AdaRound's logits (they must travel several units in a few hundred steps), and for SignRound
    its first signed step 1/iters (it decays linearly to 0)."""
    if method == "signround":
        return 1.0 / max(iters, 1)
    return 0.1 if method == "adaround" else 3e-3


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the options that take one of a fixed set."""
    return {"method": METHODS, "granularity": GRANULARITIES, "target": TARGETS, "device": DEVICES,
            "weight_scale": SCALE_SEARCH, "act_scale": SCALE_SEARCH}


def _check_range(name: str, value: Any, lo: float, hi: float, kind: type = int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is out of range: expected {kind.__name__} in [{lo}, {hi}]")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


# One line per option: the CLI builds its flags from these and the README's options table is
# generated from them (tests/test_readme.py checks both). Every QuantConfig field needs an entry.
OPTION_HELP: dict[str, str] = {
    "wbits": "weight bits, 2-8 (below 8 the integers live in an int8 container)",
    "abits": "activation bits: 8, or 0 for weight-only",
    "group_size": "weight-only (abits 0) MatMul weights: one step per group of this many input channels "
                  "(a power of two >= 16 dividing each MatMul's input dimension), written as blocked 4-bit "
                  "weights (wbits 2-4) that onnxruntime runs as MatMulNBits; 0 = one step per output channel",
    "method": "rounding method: rtn (round to nearest, nothing learned) or a learned rounder",
    "granularity": "reconstruction unit: block (a residual unit) or layer (one weighted op)",
    "target": "runtime the model is emitted for",
    "iters": "optimisation steps per block; -1: the method's default (400, signround 200)",
    "batch_size": "samples per optimisation step",
    "lr": "learning rate of the rounding parameters; -1: the method's default "
          "(flexround 3e-3, adaround 0.1, signround 1/iters)",
    "scale_lr": "learning rate of the weight step sizes (signround steps its clip factors with lr)",
    "act_lr": "learning rate of the activation step sizes",
    "weight_scale": "initial weight step: min/max or an MSE grid search",
    "act_scale": "initial activation step: min/max or an MSE grid search",
    "seed": "random seed; a seed gives byte-identical output on one machine",
    "device": "capture and reconstruction device: cpu, cuda, or auto (CUDA when usable)",
    "max_cache_mb": "RAM for captured tensors; beyond it they spill to disk",
    "calib_samples": "use at most this many calibration samples (0 = all)",
    "verify_samples": "calibration samples held out to verify the result (at most a quarter)",
    "exclude_nodes": "keep nodes in float, by name or glob pattern (repeatable)",
    "exclude_op_types": "keep every node of this op type in float (repeatable)",
    "layer_bits": "PATTERN=BITS: weight bits for the nodes whose name matches (first match wins; repeatable)",
    "input_shapes": "NAME:1x3x224x224: shape of an input for synthetic data when no calibration is given",
    "synthetic_samples": "samples generated when no calibration data is given",
    "verify_tolerance_db": "least SQNR of onnxruntime vs the torch simulation before the run fails",
    "checkpoint_dir": "folder for per-block checkpoints; a killed run restarted with the same arguments resumes there",
    "requantize": "accept an already-quantized (QDQ) model: dequantize its weights to float, drop its Q/DQ "
                  "pairs and quantize afresh (without it such a model is refused)",
}


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Everything that decides what a quantize run produces; OPTION_HELP says what each field means.

    The CLI, config files (``from_toml``) and the API build the same object. Values below 8 weight
    bits live in an int8 container; ``abits=0`` is weight-only.
    """

    wbits: int = 8
    abits: int = 8
    group_size: int = 0
    method: str = "flexround"
    granularity: str = "block"
    target: str = "onnxruntime"
    iters: int = METHOD_DEFAULT
    batch_size: int = 32
    lr: float = float(METHOD_DEFAULT)
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
    layer_bits: tuple[tuple[str, int], ...] = ()
    input_shapes: tuple[str, ...] = ()
    synthetic_samples: int = 128
    verify_tolerance_db: float = 30.0
    checkpoint_dir: str = ""
    requantize: bool = False

    def __post_init__(self) -> None:
        _check_range("wbits", self.wbits, 2, 8)
        if self.abits != 0:
            _check_range("abits", self.abits, 8, 8)
        _check_choice("method", self.method, METHODS)
        if self.iters == METHOD_DEFAULT:
            object.__setattr__(self, "iters", method_iters(self.method))
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("target", self.target, TARGETS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("weight_scale", self.weight_scale, SCALE_SEARCH)
        _check_choice("act_scale", self.act_scale, SCALE_SEARCH)
        _check_range("iters", self.iters, 0, 1_000_000)
        if self.lr == METHOD_DEFAULT:
            object.__setattr__(self, "lr", method_lr(self.method, self.iters))
        _check_range("batch_size", self.batch_size, 1, 65536)
        for name in ("lr", "scale_lr", "act_lr"):
            _check_range(name, getattr(self, name), 0.0, 1.0, float)
        _check_range("seed", self.seed, 0, 2**31 - 1)
        _check_range("max_cache_mb", self.max_cache_mb, 1, 1 << 30)
        _check_range("calib_samples", self.calib_samples, 0, 1 << 30)
        _check_range("verify_samples", self.verify_samples, 0, 1 << 20)
        _check_range("verify_tolerance_db", self.verify_tolerance_db, 0.0, 300.0, float)
        _check_range("synthetic_samples", self.synthetic_samples, 1, 1 << 20)
        if not isinstance(self.checkpoint_dir, str):
            raise ConfigError(f"checkpoint_dir={self.checkpoint_dir!r} must be a folder path (a string; '' = none)")
        if not isinstance(self.requantize, bool):
            raise ConfigError(f"requantize={self.requantize!r} must be true or false")
        for name in ("exclude_nodes", "exclude_op_types", "input_shapes"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a tuple of strings, got {value!r}")
        for spec in self.input_shapes:
            parse_input_shape(spec)
        if not isinstance(self.layer_bits, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in self.layer_bits):
            raise ConfigError(f"layer_bits must be (pattern, bits) pairs, got {self.layer_bits!r}")
        for pattern, bits in self.layer_bits:
            _check_range(f"layer_bits[{pattern!r}]", bits, 2, 8)
        self._check_group_size()

    def _check_group_size(self) -> None:
        g = self.group_size
        if g == 0:
            return
        if not isinstance(g, int) or isinstance(g, bool) or g < 16 or g & (g - 1) or g > 1 << 16:
            raise ConfigError(f"group_size={g!r} must be 0 (per channel) or a power of two in [16, 65536]")
        if self.abits != 0:
            raise ConfigError(f"group_size={g} is for weight-only runs: pass abits=0 (got abits={self.abits}), "
                              "or group_size=0 for per-channel weights")
        if self.wbits > 4:  # a layer_bits pattern above 4 is refused where it meets a grouped MatMul
            raise ConfigError(f"group_size={g} writes 4-bit weights, but wbits={self.wbits}: use wbits 2-4 "
                              "with a group size, or group_size=0")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "QuantConfig":
        """Build from a mapping; unknown keys are rejected, lists become tuples, and ``layer_bits``
        may be a {pattern: bits} table."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        if isinstance(fixed.get("layer_bits"), Mapping):
            fixed["layer_bits"] = tuple(fixed["layer_bits"].items())
        return cls(**fixed)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "QuantConfig":
        """Read a TOML file of top-level keys named like the fields; ``overrides`` win over the file."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        return cls.from_dict({**values, **overrides}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        out["layer_bits"] = dict(self.layer_bits)
        return out

    def to_toml(self) -> str:
        """Every option with its effective value, in a form ``from_toml`` reads back unchanged."""
        lines, tables = [], []
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                tables.append(f"\n[{key}]")
                tables += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines + tables) + "\n"

    def bits_for(self, node: str) -> int:
        """Weight bits of ``node``: the first ``layer_bits`` pattern that matches its name, else wbits."""
        return next((bits for pattern, bits in self.layer_bits if fnmatch.fnmatchcase(node, pattern)), self.wbits)

    def keeps_float(self, node: str, op_type: str) -> bool:
        """True when ``exclude_nodes`` (names or glob patterns) or ``exclude_op_types`` name this node."""
        return op_type in self.exclude_op_types or any(fnmatch.fnmatchcase(node, p) for p in self.exclude_nodes)

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML")


_SHAPE = re.compile(r"^([^:]+):(\d+(?:x\d+)*)$")


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """'name:1x3x224x224' → ('name', (1, 3, 224, 224))."""
    match = _SHAPE.match(spec.strip())
    if not match:
        raise ConfigError(f"input shape {spec!r} is not NAME:DxDx...D (for example input:1x3x224x224)")
    return match.group(1), tuple(int(d) for d in match.group(2).split("x"))
