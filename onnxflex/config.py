"""Frozen, keyword-only, self-validating configuration. The CLI and the API build the same objects."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from onnxflex.errors import ConfigError
from onnxflex.rounding.table import METHODS
from onnxflex.runtimes.targets import TARGETS as TARGET_TABLE

TARGETS = tuple(TARGET_TABLE)  # --target names, in the table's order
GRANULARITIES = ("block", "layer")
BLOCK_INPUTS = ("quantized", "fp")  # what a block learns on: the quantized earlier blocks' output, or the FP input
DEVICES = ("auto", "cpu", "cuda")
SCALE_SEARCH = ("minmax", "mse")
WEIGHT_GRIDS = ("auto", "symmetric", "asymmetric")  # what each means: weight_grid_of
ASYMMETRIC_AUTO_BITS = 4  # weight_grid auto: asymmetric for weight-only runs of at most this many bits
ACT_SCALE_SEARCH = ("minmax", "mse", "percentile")  # rounding/actrange.py defines the percentile range
METHOD_DEFAULT = -1  # iters or lr at -1: the method's own value (onnxflex.options.resolve gives it)
PRESET_DEFAULT = -1  # batch_size or early_stop at -1: the preset's value, resolved likewise
PRESETS = ("fast", "default", "best")  # their values: onnxflex.options.PRESET_VALUES
MAX_STEP_BUDGET = 1000.0  # step_budget: at most this many FP forward passes over the samples
MAX_TIME_BUDGET = 10080.0  # time_budget: at most a week, in minutes
MIN_BUDGET_BITS = 2  # the narrowest width mixed precision gives a layer (onnxflex.mixed)
HEAD_DEFAULT = -1  # head_bits at -1: 8 in weight-only runs below 8 bits without a budget (options.head_bits_of)
HEAD_FLOAT = 0  # head_bits 0: the head keeps its float weight
WEIGHT_ONLY_HEAD_BITS = 8  # the head's default width in weight-only runs below 8 bits


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the options that take one of a fixed set."""
    return {"method": METHODS, "granularity": GRANULARITIES, "block_input": BLOCK_INPUTS, "target": TARGETS,
            "device": DEVICES, "weight_scale": SCALE_SEARCH, "act_scale": ACT_SCALE_SEARCH, "preset": PRESETS,
            "weight_grid": WEIGHT_GRIDS}


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
    "group_size": "weight-only (abits 0) MatMul and Gemm weights: one step per group of this many input "
                  "channels (a power of two >= 16), written as blocked 4-bit "
                  "weights (wbits 2-4) that onnxruntime runs as MatMulNBits; a group wider than the input dimension, or "
                  "one that does not divide it, leaves a short last group (zero padding, as DequantizeLinear and "
                  "MatMulNBits define it); 0 = one step per output channel",
    "head_bits": "weight bits of the model's head (each MatMul/Gemm whose output is a graph output, through "
                 "Reshape/Transpose/Cast/Identity/Squeeze/Unsqueeze/Flatten only: an LM's lm_head) in weight-only runs "
                 "(abits 0): 2-8, or 0 to keep it float; 5-8 bits with a group size are blocked 8-bit weights that "
                 "onnxruntime runs as MatMulNBits bits=8, per channel int8 without one; -1: 8 when wbits is below 8 "
                 "and no mixed-precision budget is set, else wbits; exclude_nodes and layer_bits patterns win",
    "method": "rounding method: rtn (round to nearest, nothing learned), hqq (data-free refined steps) or a "
              "learned rounder",
    "granularity": "reconstruction unit: block (a residual unit) or layer (one weighted op)",
    "block_input": "what each block learns on: quantized (the quantized model's output of the earlier blocks) or fp "
                   "(the captured FP input, so no block depends on another's result)",
    "target": "runtime the model is emitted for",
    "preset": "speed against quality of learned rounding, for the options left at -1: fast (at most a quarter "
              "of the method's iterations, early stop on a loss plateau, a step budget of one FP pass), default (the "
              "method's iterations, its learning capped at 3e12 FLOPs, at most about 8 minutes of a 2-core CPU: a model whose "
              "full schedule costs more gets the cap as its step budget), best (2.5x the iterations, batches of 64, no "
              "cap); the report gives what it resolved to",
    "iters": "optimisation steps per block; -1: the method's default (400, signround 200) times the "
             "preset's scale (fast 1/4, best 2.5)",
    "batch_size": "samples per optimisation step; -1: the preset's (32; best 64)",
    "early_stop": "when a block's smoothed loss has not improved by 1% for this many steps, anneal its rates "
                  "over as many more and stop (the report gives the steps run); 0 = off; -1: the preset's "
                  "(fast: a fifth of the iterations; default, best: off); adaround needs 0 (its regulariser "
                  "anneals over every iteration)",
    "step_budget": "optimisation work for the whole reconstruction as a multiple of one FP forward pass over the "
                   "reconstruction samples, shared among the blocks by how much round-to-nearest loses on them per "
                   "FLOP spent (each block at most its iterations; a block left without steps keeps "
                   "round-to-nearest); 0 = off (every block runs its iterations, no cap); -1: the preset's (fast 1, "
                   "best off, default off within its cap)",
    "time_budget": "minutes of learning for the whole reconstruction, shared among the blocks like step_budget and "
                   "converted to FLOPs with a FLOP rate measured on this machine at the start, so the output "
                   "depends on the machine and its load; 0 = off; replaces the preset's step budget (not both: "
                   "leave step_budget at -1)",
    "lr": "learning rate of the rounding parameters; -1: the method's default "
          "(flexround 3e-3, adaround 0.1, signround 1/iters)",
    "scale_lr": "learning rate of the weight step sizes (signround steps its clip factors with lr)",
    "act_lr": "learning rate of the activation step sizes",
    "weight_scale": "initial weight step: min/max or an MSE grid search; below 8 bits a symmetric MSE step is "
                    "then unshrunk (the rounded weight keeps the float weight's projection on itself)",
    "act_scale": "initial activation step: percentile (a signed grid ends at the 99.999th percentile of the "
                 "magnitudes over all calibration values; an unsigned grid clips its maximum at that percentile "
                 "of the positive values and its minimum at that of the negative ones), min/max, or an MSE grid "
                 "search over shrunk min/max ranges",
    "weight_grid": "weight integer grid: symmetric (signed, zero point 0), asymmetric (unsigned with a zero point "
                   "per channel or group; weight-only runs on targets that take weight zero points), or auto "
                   "(asymmetric for weight-only runs at 4 bits or fewer where the target takes them, else symmetric)",
    "reparam_layernorm": "fold per-channel LayerNorm output ranges into the LayerNorm and the MatMul/Gemm reading "
                         "it, so one per-tensor activation step serves every channel (exact in float)",
    "seed": "random seed; a seed gives byte-identical output on one machine",
    "device": "capture and reconstruction device: cpu, cuda, or auto (CUDA when usable)",
    "threads": "torch threads while reconstructing on the CPU; 0 = one per 256k values of a block's largest "
               "tensor, at most torch's count and the CPUs the process may use (small blocks run on one: on "
               "a busy machine their ops lose far more to thread hand-offs than they gain on an idle one); "
               "a seed gives the same output only at one count",
    "workers": "processes for reconstruction: with block_input fp they learn blocks at the same time (each block an "
               "independent job); with quantized input blocks learn here in order while the workers build the next "
               "blocks' weight steps; each gets max(1, CPUs / workers) torch threads, and the output is byte-identical "
               "to one worker's where the blocks' thread counts agree (blocks under 256k values per tensor, or "
               "--threads at most CPUs / workers); a worker that dies has its job run again in a fresh one",
    "ray_address": "run the block jobs as Ray tasks on the cluster at this address (its head node's host:port, 'auto' "
                   "on one of its nodes; ray://host:port for its Ray Client server), or 'local' for a Ray instance "
                   "on this machine with --workers CPUs (needs pip install onnxflex[ray]; the cluster's nodes must "
                   "import onnxflex and see the spill folder's files; a cluster with token authentication needs "
                   "RAY_AUTH_MODE=token and its token here too); '' = local processes",
    "max_cache_mb": "RAM for captured tensors; beyond it they spill to files in the temporary folder ($TMPDIR), "
                    "and a run whose estimated spill exceeds that disk's free space is refused before it starts",
    "calib_samples": "use at most this many calibration samples (0 = all)",
    "verify_samples": "calibration samples held out to verify the result (at most a quarter)",
    "exclude_nodes": "keep nodes in float, by name or glob pattern (repeatable)",
    "exclude_op_types": "keep every node of this op type in float (repeatable)",
    "layer_bits": "PATTERN=BITS: weight bits for the nodes whose name matches (first match wins; repeatable)",
    "bits_budget": "mixed precision: average weight bits over the quantized layers (weighted by parameter "
                   "count; float layers do not count), each layer getting 2 to wbits bits by its measured "
                   "sensitivity; layers named by layer_bits keep their bits; 0 = off",
    "size_budget_mb": "mixed precision: MiB for the quantized layers' weights, counted as a runtime with INT4 "
                      "stores them (2-4 bits packed INT4, 5-8 bits int8, plus float32 scales); the emitted QDQ "
                      "file packs INT4 only for weight-only grouped MatMul/Gemm layers (the report gives both sizes); 0 = off",
    "input_shapes": "NAME:1x3x224x224: shape of an input for synthetic data when no calibration is given",
    "fix_inputs": "NAME=VALUE: pin a model input to a constant (a number, or comma-separated numbers for a 1-D "
                  "input), e.g. a sample rate: calibration needs no data for it and branches it selects fold "
                  "away (repeatable)",
    "batch_axes": "NAME=AXIS: the axis that carries the samples of an input whose batch is not on axis 0, e.g. "
                  "a recurrent state[2, N, 128] (state=1); found from the data when only one axis fits (repeatable)",
    "synthetic_samples": "samples generated when no calibration data is given (also the number of token windows "
                         "cut from a .txt calibration when calib_samples is 0)",
    "tokenizer": "tokenizer.json (the tokenizers library, the text extra) that turns a .txt calibration into "
                 "token ids; required with a .txt calibration, refused without one",
    "seq_len": "tokens per window cut from a .txt calibration (0 = the model's fixed input_ids length)",
    "verify_tolerance_db": "least SQNR of onnxruntime vs the torch simulation before the run fails",
    "checkpoint_dir": "folder for per-block checkpoints; a killed run restarted with the same arguments resumes there",
    "optimize_latency": "time every layer as integer and as float in onnxruntime on this machine (one calibration "
                        "batch) and keep in float the layers that make the model slower as integers",
    "latency_rules": "keep float the weighted layers that sum too few products per output to gain as integers "
                     "on the target (depthwise convs, convs over 1-3 channels, MatMuls with a small K: reduction "
                     "depth below the target's float_depth, 32 on onnxruntime, off on tensorrt), unless only "
                     "integer layers read their output; static, and the report names them",
    "latency_threads": "onnxruntime threads for --optimize-latency timing and the report's measured latency ratio "
                       "(0 = onnxruntime's default); use the "
                       "thread count the model will be deployed with",
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
    head_bits: int = HEAD_DEFAULT
    method: str = "flexround"
    granularity: str = "block"
    block_input: str = "quantized"
    target: str = "onnxruntime"
    preset: str = "default"
    iters: int = METHOD_DEFAULT
    batch_size: int = PRESET_DEFAULT
    early_stop: int = PRESET_DEFAULT
    step_budget: float = float(PRESET_DEFAULT)
    time_budget: float = 0.0
    lr: float = float(METHOD_DEFAULT)
    scale_lr: float = 1e-3
    act_lr: float = 2e-4
    weight_scale: str = "mse"
    act_scale: str = "percentile"
    weight_grid: str = "auto"
    reparam_layernorm: bool = True
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    workers: int = 1
    ray_address: str = ""
    max_cache_mb: int = 2048
    calib_samples: int = 0
    verify_samples: int = 32
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    layer_bits: tuple[tuple[str, int], ...] = ()
    bits_budget: float = 0.0
    size_budget_mb: float = 0.0
    input_shapes: tuple[str, ...] = ()
    fix_inputs: tuple[str, ...] = ()
    batch_axes: tuple[str, ...] = ()
    synthetic_samples: int = 128
    tokenizer: str = ""
    seq_len: int = 0
    verify_tolerance_db: float = 30.0
    checkpoint_dir: str = ""
    requantize: bool = False
    optimize_latency: bool = False
    latency_rules: bool = True
    latency_threads: int = 0

    def __post_init__(self) -> None:
        """Checks every value and changes none: -1 stays -1 (``onnxflex.options.resolve`` gives the values a
        run uses), so the object holds what the user gave."""
        _check_range("wbits", self.wbits, 2, 8)
        if self.abits not in (0, 8) or isinstance(self.abits, bool):
            raise ConfigError(f"abits={self.abits!r} is out of range: expected 8, or 0 for weight-only")
        _check_choice("method", self.method, METHODS)
        _check_choice("preset", self.preset, PRESETS)
        self._check_defaults()
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("block_input", self.block_input, BLOCK_INPUTS)
        _check_choice("target", self.target, TARGETS)
        _check_choice("device", self.device, DEVICES)
        _check_range("threads", self.threads, 0, 4096)
        self._check_workers()
        _check_choice("weight_scale", self.weight_scale, SCALE_SEARCH)
        _check_choice("act_scale", self.act_scale, ACT_SCALE_SEARCH)
        self._check_learning()
        self._check_step_budgets()
        _check_range("seed", self.seed, 0, 2**31 - 1)
        _check_range("max_cache_mb", self.max_cache_mb, 1, 1 << 30)
        _check_range("calib_samples", self.calib_samples, 0, 1 << 30)
        _check_range("verify_samples", self.verify_samples, 0, 1 << 20)
        _check_range("verify_tolerance_db", self.verify_tolerance_db, 0.0, 300.0, float)
        _check_range("synthetic_samples", self.synthetic_samples, 1, 1 << 20)
        _check_range("seq_len", self.seq_len, 0, 1 << 24)
        if not isinstance(self.tokenizer, str):
            raise ConfigError(f"tokenizer={self.tokenizer!r} must be a tokenizer.json path (a string; '' = none)")
        _check_range("latency_threads", self.latency_threads, 0, 1024)
        if not isinstance(self.checkpoint_dir, str):
            raise ConfigError(f"checkpoint_dir={self.checkpoint_dir!r} must be a folder path (a string; '' = none)")
        self._check_lists()
        self._check_group_size()
        self._check_weight_grid()
        self._check_budgets()
        self._check_head_bits()

    def _check_workers(self) -> None:
        _check_range("workers", self.workers, 1, 1024)
        if not isinstance(self.ray_address, str):
            raise ConfigError(f"ray_address={self.ray_address!r} must be a Ray address or 'local' (a string; '' = none)")
        if self.ray_address and importlib.util.find_spec("ray") is None:
            raise ConfigError(f"ray_address={self.ray_address!r} needs Ray, which is not installed: "
                              "pip install onnxflex[ray]")
        if self.ray_address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
            raise ConfigError(f"ray_address={self.ray_address!r} is a Ray Client address, which needs grpcio (not "
                              "installed): pip install onnxflex[ray]")

    def _check_weight_grid(self) -> None:
        _check_choice("weight_grid", self.weight_grid, WEIGHT_GRIDS)
        if self.weight_grid != "asymmetric":
            return
        if not TARGET_TABLE.get(self.target).weight_only_zero_points:
            raise ConfigError(f"weight_grid='asymmetric' needs weight zero points, which target {self.target!r} "
                              "does not take: use weight_grid='symmetric' (or 'auto'), or another target")
        if self.abits != 0:
            raise ConfigError(f"weight_grid='asymmetric' is built for weight-only runs (abits 0), got abits="
                              f"{self.abits}: pass abits=0, or weight_grid='symmetric' (or 'auto')")

    def _check_defaults(self) -> None:
        """-1 means "the method's / preset's default"; any other negative value is refused naming it."""
        for name, hi in (("iters", 1_000_000), ("batch_size", 65536), ("early_stop", 1_000_000)):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0 and value != -1:
                raise ConfigError(f"{name}={value!r} is out of range: expected -1 (the default) or an int in "
                                  f"[{0 if name != 'batch_size' else 1}, {hi}]")
        if isinstance(self.lr, (int, float)) and self.lr < 0 and self.lr != -1:
            raise ConfigError(f"lr={self.lr!r} is out of range: expected -1 (the method's default) or a float in "
                              "[0.0, 1.0]")

    def _check_learning(self) -> None:
        """The reconstruction options, each at -1 (resolved later) or in its range; early stop cannot
        cut AdaRound short."""
        for name, lo, hi in (("iters", 0, 1_000_000), ("batch_size", 1, 65536), ("early_stop", 0, 1_000_000)):
            if getattr(self, name) != PRESET_DEFAULT:
                _check_range(name, getattr(self, name), lo, hi)
        if self.early_stop != PRESET_DEFAULT and self.early_stop and self.method == "adaround":
            raise ConfigError(f"early_stop={self.early_stop} does not work with method adaround: its regulariser "
                              "anneals over all iterations and a stop before the end leaves weights rounded "
                              "softly; pass early_stop=0 (or --early-stop 0), or use flexround or signround")
        for name in ("lr", "scale_lr", "act_lr"):
            if name != "lr" or self.lr != METHOD_DEFAULT:
                _check_range(name, getattr(self, name), 0.0, 1.0, float)

    def _check_step_budgets(self) -> None:
        """step_budget: -1 (the preset's) or a multiple in [0, MAX_STEP_BUDGET]; time_budget: minutes in
        [0, MAX_TIME_BUDGET]; not both set."""
        step, minutes = as_float(self.step_budget), as_float(self.time_budget)
        if step != PRESET_DEFAULT:
            _check_range("step_budget", step, 0.0, MAX_STEP_BUDGET, float)
        _check_range("time_budget", minutes, 0.0, MAX_TIME_BUDGET, float)
        if step != PRESET_DEFAULT and minutes:
            raise ConfigError(f"step_budget={step:g} and time_budget={minutes:g} are both set: give one (leave "
                              "step_budget at -1 with --time-budget)")

    def _check_lists(self) -> None:
        """On/off options are booleans; the repeatable options are tuples of well-formed specs."""
        for f in dataclasses.fields(self):  # every on/off option: a string such as "yes" is no answer
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r} must be true or false")
        for name in ("exclude_nodes", "exclude_op_types", "input_shapes", "fix_inputs", "batch_axes"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a tuple of strings, got {value!r}")
        for spec in self.input_shapes:
            parse_input_shape(spec)
        for spec in self.fix_inputs:
            parse_fixed_input(spec)
        for spec in self.batch_axes:
            parse_batch_axis(spec)
        if not isinstance(self.layer_bits, tuple) or not all(
                isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in self.layer_bits):
            raise ConfigError(f"layer_bits must be (pattern, bits) pairs, got {self.layer_bits!r}")
        for pattern, bits in self.layer_bits:
            _check_range(f"layer_bits[{pattern!r}]", bits, 2, 8)

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

    def _check_head_bits(self) -> None:
        """-1 (the default), 0 (float) or 2-8, set only for weight-only runs; under a budget the head is
        the allocation's to choose (a layer_bits pattern pins it)."""
        h = self.head_bits
        if h not in (HEAD_DEFAULT, HEAD_FLOAT):
            _check_range("head_bits", h, 2, 8)
        if h == HEAD_DEFAULT:
            return
        if self.abits != 0:
            raise ConfigError(f"head_bits={h} is for weight-only runs: pass abits=0 (got abits={self.abits}), or "
                              "leave head_bits at -1 (keep the head float with exclude_nodes, set its bits with "
                              "layer_bits)")
        if as_float(self.bits_budget) or as_float(self.size_budget_mb):
            raise ConfigError(f"head_bits={h} beside a mixed-precision budget: the budget chooses the head's bits "
                              "too; leave head_bits at -1, and pin the head with layer_bits ('NAME=BITS') or keep "
                              "it float with exclude_nodes")

    def _check_budgets(self) -> None:
        """Mixed-precision budgets: numbers (ints become floats), at most one of them set, an average
        within the widths a layer may get (MIN_BUDGET_BITS to wbits). Ints are read as floats (the
        config keeps the int; ``resolve`` gives the float)."""
        _check_range("size_budget_mb", as_float(self.size_budget_mb), 0.0, float(1 << 30), float)
        b = as_float(self.bits_budget)
        if not isinstance(b, float) or not (b == 0.0 or MIN_BUDGET_BITS <= b <= self.wbits):
            wider = f" (wbits={self.wbits} is the widest a layer gets: raise --wbits for a larger budget)" \
                if isinstance(b, float) and b > self.wbits else ""
            raise ConfigError(f"bits_budget={b!r} is out of range: expected 0 (off) or an average in "
                              f"[{MIN_BUDGET_BITS}, {self.wbits}]{wider}")
        if b and self.size_budget_mb:
            raise ConfigError(f"bits_budget={b:g} and size_budget_mb={as_float(self.size_budget_mb):g} are both set: "
                              "give one budget (set the other to 0)")

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
        return cls.from_dict({**read_toml(path), **overrides}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Every option as given (-1 where left to the method or preset), as plain TOML/JSON values."""
        return plain(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


def weight_grid_of(config: QuantConfig) -> str:
    """The grid a run with ``config`` uses, 'symmetric' or 'asymmetric': ``weight_grid`` unless it is
    'auto', which is asymmetric for weight-only runs (abits 0) of at most ASYMMETRIC_AUTO_BITS wbits on
    a target that takes weight zero points (Target.weight_only_zero_points), else symmetric."""
    if config.weight_grid != "auto":
        return config.weight_grid
    takes = TARGET_TABLE.get(config.target).weight_only_zero_points
    return "asymmetric" if takes and config.abits == 0 and config.wbits <= ASYMMETRIC_AUTO_BITS else "symmetric"


def as_float(value: Any) -> Any:
    """An int budget as the float it stands for; anything else unchanged (the range check refuses it)."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """Option values as TOML/JSON reads them: tuples become lists, ``layer_bits`` a {pattern: bits} table."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    out["layer_bits"] = dict(values["layer_bits"])
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """The top-level keys of a TOML config file (checked when a QuantConfig is built from them)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


_SHAPE = re.compile(r"^([^:]+):(\d+(?:x\d+)*)$")


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """'name:1x3x224x224' → ('name', (1, 3, 224, 224))."""
    match = _SHAPE.match(spec.strip())
    if not match:
        raise ConfigError(f"input shape {spec!r} is not NAME:DxDx...D (for example input:1x3x224x224)")
    return match.group(1), tuple(int(d) for d in match.group(2).split("x"))


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_FIXED = re.compile(rf"^([^=]+)=({_NUMBER}(?:,{_NUMBER})*)$")
_AXIS = re.compile(r"^([^=]+)=(\d+)$")


def parse_fixed_input(spec: str) -> tuple[str, tuple[float, ...] | float]:
    """'sr=16000' → ('sr', 16000.0) for a 0-d input; 'w=1,2,3' → ('w', (1.0, 2.0, 3.0)) for a 1-D one.
    The value takes the input's dtype where it is used."""
    match = _FIXED.match(spec.strip())
    if not match:
        raise ConfigError(f"fixed input {spec!r} is not NAME=VALUE with a number or comma-separated numbers "
                          "(for example sr=16000)")
    values = tuple(float(v) for v in match.group(2).split(","))
    return match.group(1), values[0] if len(values) == 1 and "," not in match.group(2) else values


def parse_batch_axis(spec: str) -> tuple[str, int]:
    """'state=1' → ('state', 1)."""
    match = _AXIS.match(spec.strip())
    if not match:
        raise ConfigError(f"batch axis {spec!r} is not NAME=AXIS with a non-negative axis (for example state=1)")
    return match.group(1), int(match.group(2))
