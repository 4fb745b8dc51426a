"""What each stage of a run is given: ``resolve(QuantConfig) -> Resolved``, a pure function.

A QuantConfig holds the options as the user gave them (-1 where the method or preset decides).
``resolve`` fills those in and splits the result into one frozen record per stage, so that a stage
reads its own part and nothing else:

    PlanOptions      the graph passes and the plan (bits, groups, target, exclusions, pinned inputs)
    RoundingOptions  reconstruction: the method, its resolved schedule, step searches, threads, checkpoints
    CaptureOptions   where tensors are captured and how much RAM holds them
    RefineOptions    which plan changes that need data run: LayerNorm folding, latency placement
    Budgets          mixed precision: the budgets and what the allocation reads beside them
    VerifyOptions    the gate on the emitted model
    DataOptions      calibration and synthetic data, and how many samples are held out

Field names are the QuantConfig's, but for PLANNED_FIELDS, which no option sets, and PRESET_FIELDS, which
the preset alone sets. A value read by two stages is copied into both records
(``abits``: plan and rounding; ``seed``: rounding and data; ``fix_inputs``: plan and data; ``wbits`` and
``layer_bits``: plan and budgets; ``weight_scale``: rounding and budgets); only ``resolve`` builds the
records, so the copies agree (``Resolved.to_dict`` refuses records that disagree). Values a stage
replaces during a run live in one record: ``batch_size`` (rounding; the pipeline passes it to
verification and latency timing), ``accumulate`` (rounding; set by planning for a fixed-batch model)
and ``exclude_nodes`` (plan). ``target`` lives in the plan; the
stages after planning are given the Target object.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping

from onnxflex.config import (HEAD_DEFAULT, METHOD_DEFAULT, PRESET_DEFAULT, WEIGHT_ONLY_HEAD_BITS, QuantConfig, as_float,
                             plain, weight_grid_of)
from onnxflex.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Preset:
    """What a preset sets where an option is left at -1: the method's iterations times ``iters_scale``,
    ``batch_size`` samples per step, and early stop after ``patience`` × iterations steps without
    improvement (0: off; always off for AdaRound, whose regulariser anneals over every step), and a
    step budget of ``step_budget`` FP forward passes over the samples where ``step_budget`` is -1 (0: off;
    onnxflex/budget.py). ``step_cap`` (FLOPs, 0: none) bounds the learning where ``step_budget`` is -1
    and no time budget is given: a plan whose full schedule costs more is given ``step_cap`` FLOPs as its
    step budget; a plan within it runs every block's iterations (budget.plan_budget)."""

    iters_scale: float
    batch_size: int
    patience: float
    step_budget: float = 0.0
    step_cap: float = 0.0


FAST_STEP_BUDGET = 1.0  # fast: the learning costs about one more FP pass over the samples than RTN
# default: at most this much learning work (budget.step_cost's FLOPs). On an idle 2-core CPU the fast
# preset's learning did 6.5 GFLOP/s of them on the slowest of the real models (bench/real_models.py:
# ppocr_det, most of it in a 3-channel stem on 736x736 inputs whose activations cost more than its
# products), 14 on ppocr_rec, 37-45 on the other detectors: the cap is about 8 minutes of learning at
# 6.5, and ppocr_det's default run learned it in about 3 CPU minutes (its split spent it on Conv blocks)
DEFAULT_STEP_CAP = 3e12

PRESET_VALUES = {"fast": Preset(iters_scale=0.25, batch_size=32, patience=0.2, step_budget=FAST_STEP_BUDGET),
                 "default": Preset(iters_scale=1.0, batch_size=32, patience=0.0, step_cap=DEFAULT_STEP_CAP),
                 "best": Preset(iters_scale=2.5, batch_size=64, patience=0.0)}


def method_iters(method: str) -> int:
    """Reconstruction steps per block of the default preset when ``iters`` is -1: 400, SignRound 200 (its
    paper's default); the other presets scale it (Preset.iters_scale)."""
    return 200 if method == "signround" else 400


def method_lr(method: str, iters: int) -> float:
    """The rounding parameters' rate when ``lr`` is -1: Adam's 3e-3 for FlexRound's log-steps, 0.1
    for AdaRound's logits (they must travel several units in a few hundred steps), and for SignRound
    its first signed step 1/iters (it decays linearly to 0)."""
    if method == "signround":
        return 1.0 / max(iters, 1)
    return 0.1 if method == "adaround" else 3e-3


class _Record:
    """A stage's record: frozen; ``replace`` gives a copy with some fields changed."""

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class PlanOptions(_Record):
    """What the graph passes and the plan read: layer selection, bits, groups, the target's rules."""

    wbits: int
    abits: int
    group_size: int
    head_bits: int
    granularity: str
    target: str
    exclude_nodes: tuple[str, ...]
    exclude_op_types: tuple[str, ...]
    layer_bits: tuple[tuple[str, int], ...]
    fix_inputs: tuple[str, ...]
    requantize: bool
    latency_rules: bool

    def bits_for(self, node: str, head: bool = False) -> int:
        """Weight bits of ``node``: the first ``layer_bits`` pattern that matches its name, else
        ``head_bits`` for a head (0: it stays float), else wbits."""
        return next((bits for pattern, bits in self.layer_bits if fnmatch.fnmatchcase(node, pattern)),
                    self.head_bits if head else self.wbits)

    def keeps_float(self, node: str, op_type: str) -> bool:
        """True when ``exclude_nodes`` (names or glob patterns) or ``exclude_op_types`` name this node."""
        return op_type in self.exclude_op_types or any(fnmatch.fnmatchcase(node, p) for p in self.exclude_nodes)


@dataclass(frozen=True, kw_only=True)
class RoundingOptions(_Record):
    """What reconstruction reads: the method with its resolved schedule (``iters``, ``batch_size``,
    ``early_stop``, ``lr``: never -1 here), the step budgets (``step_budget`` never -1 here, 0 with a
    ``time_budget``; ``step_cap``: the preset's cap in FLOPs, 0 where a step or time budget is given;
    onnxflex/budget.py), step searches, the weight grid (``weight_grid``: 'symmetric'
    or 'asymmetric' here, never 'auto'), the block seed base, threads, checkpoints, what each block
    learns on (``block_input``). ``accumulate`` (micro-batches of ``batch_size`` summed per step) is no
    option: planning sets it for a model with a fixed batch (planning.fixed_batch_rounding), 1 everywhere
    else."""

    method: str
    preset: str
    iters: int
    batch_size: int
    early_stop: int
    step_budget: float
    time_budget: float
    lr: float
    scale_lr: float
    act_lr: float
    weight_scale: str
    act_scale: str
    weight_grid: str
    abits: int
    seed: int
    threads: int
    checkpoint_dir: str
    block_input: str = "quantized"
    workers: int = 1
    ray_address: str = ""
    accumulate: int = 1
    step_cap: float = 0.0


@dataclass(frozen=True, kw_only=True)
class CaptureOptions(_Record):
    """Where capture and reconstruction run, and the RAM for captured tensors."""

    device: str
    max_cache_mb: int


@dataclass(frozen=True, kw_only=True)
class RefineOptions(_Record):
    """Which data-driven plan changes run: LayerNorm folding, latency placement (and its onnxruntime
    threads); mixed precision runs when a Budgets value is set."""

    reparam_layernorm: bool
    optimize_latency: bool
    latency_threads: int


@dataclass(frozen=True, kw_only=True)
class Budgets(_Record):
    """What mixed precision reads: the budgets (floats; at most one non-zero, both 0: off), the widest
    width ``wbits``, the ``layer_bits`` patterns that pin layers, and the weight step search."""

    bits_budget: float
    size_budget_mb: float
    wbits: int
    layer_bits: tuple[tuple[str, int], ...]
    weight_scale: str

    @property
    def active(self) -> bool:
        """True when a budget is set, so mixed precision runs."""
        return bool(self.bits_budget or self.size_budget_mb)


@dataclass(frozen=True, kw_only=True)
class VerifyOptions(_Record):
    """The gate on the emitted model: least SQNR of onnxruntime against the torch simulation."""

    verify_tolerance_db: float


@dataclass(frozen=True, kw_only=True)
class DataOptions(_Record):
    """Calibration data: how many samples to use and hold out, and synthetic inputs when none are given."""

    calib_samples: int
    verify_samples: int
    synthetic_samples: int
    input_shapes: tuple[str, ...]
    fix_inputs: tuple[str, ...]
    batch_axes: tuple[str, ...]
    tokenizer: str
    seq_len: int
    seed: int


PLANNED_FIELDS = frozenset({"accumulate"})  # record fields a stage sets, not the user: no QuantConfig option
PRESET_FIELDS = frozenset({"step_cap"})  # record fields resolve takes from the preset alone: no QuantConfig option

_PARTS = {"plan": PlanOptions, "rounding": RoundingOptions, "capture": CaptureOptions, "refine": RefineOptions,
          "budgets": Budgets, "verify": VerifyOptions, "data": DataOptions}


@dataclass(frozen=True, kw_only=True)
class Resolved:
    """The options a run uses, one record per stage (see the module docstring)."""

    plan: PlanOptions
    rounding: RoundingOptions
    capture: CaptureOptions
    refine: RefineOptions
    budgets: Budgets
    verify: VerifyOptions
    data: DataOptions

    def replace(self, **parts: Any) -> "Resolved":
        return dataclasses.replace(self, **parts)

    def to_dict(self) -> dict[str, Any]:
        """Every option with the value the run uses, in QuantConfig's order and form (the report's
        "config" section, the checkpoint fingerprint)."""
        merged: dict[str, Any] = {}
        for part in _PARTS:
            for key, value in dataclasses.asdict(getattr(self, part)).items():
                if merged.setdefault(key, value) != value:
                    raise RuntimeError(f"{key} differs between the resolved records ({merged[key]!r}, "
                                       f"{value!r}): replace it in every record that holds it")
        return plain({f.name: merged[f.name] for f in dataclasses.fields(QuantConfig)})

    def to_toml(self) -> str:
        """Every option with its effective value, in a form ``QuantConfig.from_toml`` reads back to a
        config that resolves to this one."""
        return _toml(self.to_dict(), {}, [])


def resolve(config: QuantConfig) -> Resolved:
    """The options a run with ``config`` uses: -1 iterations, batch size, early stop, step budget and rate
    take the method's and preset's values (explicit values win; a time budget turns the preset's step
    budget off); budgets become floats. ``config`` is unchanged."""
    preset = PRESET_VALUES[config.preset]
    iters = config.iters
    if iters == METHOD_DEFAULT:
        iters = max(1, round(method_iters(config.method) * preset.iters_scale))
    early_stop = config.early_stop
    if early_stop == PRESET_DEFAULT:
        early_stop = 0 if config.method == "adaround" else round(iters * preset.patience)
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    values.update(iters=iters, early_stop=early_stop,
                  batch_size=preset.batch_size if config.batch_size == PRESET_DEFAULT else config.batch_size,
                  lr=method_lr(config.method, iters) if config.lr == METHOD_DEFAULT else config.lr,
                  bits_budget=as_float(config.bits_budget), size_budget_mb=as_float(config.size_budget_mb),
                  weight_grid=weight_grid_of(config), time_budget=as_float(config.time_budget),
                  head_bits=head_bits_of(config),
                  step_budget=_step_budget(config, preset), step_cap=_step_cap(config, preset))
    return Resolved(**{part: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)
                                    if f.name not in PLANNED_FIELDS})
                       for part, cls in _PARTS.items()})


def head_bits_of(config: QuantConfig) -> int:
    """The head's bits in a run with ``config`` (0: float): ``head_bits`` when given; at -1,
    WEIGHT_ONLY_HEAD_BITS in a weight-only run below that many bits without a budget (mixed precision
    chooses the head's bits like any layer's), else wbits (the head is no different)."""
    if config.head_bits != HEAD_DEFAULT:
        return config.head_bits
    budget = as_float(config.bits_budget) or as_float(config.size_budget_mb)
    if config.abits == 0 and config.wbits < WEIGHT_ONLY_HEAD_BITS and not budget:
        return WEIGHT_ONLY_HEAD_BITS
    return config.wbits


def _step_budget(config: QuantConfig, preset: Preset) -> float:
    """The step budget a run uses: the given one, else 0 beside a time budget, else the preset's."""
    if config.step_budget != PRESET_DEFAULT:
        return as_float(config.step_budget)
    return 0.0 if config.time_budget else preset.step_budget


def _step_cap(config: QuantConfig, preset: Preset) -> float:
    """The preset's cap on the learning (FLOPs), where no step or time budget is given; else 0."""
    return preset.step_cap if config.step_budget == PRESET_DEFAULT and not config.time_budget else 0.0


def given_toml(config: QuantConfig) -> str:
    """Every option as the user gave it (-1 staying -1), in a form ``QuantConfig.from_toml`` reads back
    to ``config``. Where the value the run uses differs, a comment gives it, so that editing ``method``
    or ``preset`` in the file changes what the -1 options resolve to."""
    as_given, used = config.to_dict(), resolve(config).to_dict()
    notes = {key: f"  # resolved: {_toml_value(used[key])}" for key, value in as_given.items()
             if value != used[key] and not isinstance(value, dict)}
    return _toml(as_given, notes, ["# onnxflex quantize options as given; -1 = the method's or preset's "
                                   "default. A comment gives", "# the value a run with this file uses where "
                                   "it differs (it follows method and preset)."])


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


def _toml(values: Mapping, notes: Mapping[str, str], header: list[str]) -> str:
    """``values`` as TOML: plain keys first (each followed by its ``notes`` entry), then one table per
    mapping value."""
    lines, tables = list(header), []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]")
            tables += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {_toml_value(value)}{notes.get(key, '')}")
    return "\n".join(lines + tables) + "\n"
