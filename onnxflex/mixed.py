"""Mixed precision (after Yvinec et al., 2308.07662): per-layer weight bits chosen from each layer's
measured sensitivity so that the quantized weights meet a budget.

Budgets (onnxflex.options.Budgets; one at a time):
  bits_budget     average weight bits over the quantized layers, weighted by parameter count:
                  Σ_l bits_l · params_l ≤ bits_budget · Σ_l params_l. Layers kept in float are not
                  quantized layers and do not count.
  size_budget_mb  MiB (2**20 bytes) of the quantized layers' weights as a runtime with INT4 weights
                  stores them (``size_bits``): 2-4 bit integers packed as INT4, 5-8 bit integers as
                  int8 (a 5-bit layer costs what an 8-bit one does, so this budget picks between the
                  4- and 8-bit containers), plus one float32 scale per step and, per channel, the
                  int8 zero point the emitter writes. The emitted QDQ file packs INT4 only for
                  weight-only grouped MatMul/Gemm layers and keeps other sub-8-bit weights in int8 containers;
                  the report gives both sizes (``size_mb`` and ``emitted_mb``).

Candidates: every width from 2 bits to ``wbits`` (the widest a layer may get; 2-4 for weight-only
grouped MatMuls, which ``group_size`` already requires of wbits). A layer that an explicit
``layer_bits`` pattern names is pinned at those bits: it counts toward the budget, is not measured
and is not changed.

Choice: with s_l(b) from onnxflex.sensitivity and the layers' errors taken as independent and
additive, pick one width per weight minimising Σ_l s_l(b_l) within the budget: a multiple-choice
knapsack solved exactly by dynamic programming over the cost (``solve``). The plan's layers then
carry the chosen bits, so reconstruction and emitting run unchanged.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from onnxflex.blocks import BlockPlan, QuantLayer
from onnxflex.calib import CalibrationSet
from onnxflex.config import MIN_BUDGET_BITS
from onnxflex.errors import ConfigError
from onnxflex.options import Budgets
from onnxflex.progress import Progress

log = logging.getLogger("onnxflex")

MIB_BITS = 8 << 20  # bits in one MiB
SCALE_BITS, ZERO_POINT_BITS = 32, 8
DP_BUCKETS = 1 << 16  # the knapsack table's cost resolution at most; exact below it (see solve)


def container_bits(bits: int) -> int:
    """Bits one weight takes in storage: INT4 for 2-4 bit integers, int8 for 5-8."""
    return 4 if bits <= 4 else 8


@dataclass(frozen=True)
class WeightChoice:
    """One quantized weight initializer (every node reading it gets the same bits).

    params: elements of the weight; steps: its scales (output channels, or groups when grouped).
    sensitivity: {bits: relative output error} for the measured widths (empty when pinned).
    """

    weight: str
    nodes: tuple[str, ...]
    op_type: str
    params: int
    steps: int
    grouped: bool
    pinned: bool
    bits: int
    sensitivity: Mapping[int, float] = dataclasses.field(default_factory=dict)

    def size_bits(self, bits: int | None = None) -> int:
        """Storage at ``bits`` (default: the chosen bits) as the size budget counts it."""
        return container_bits(self.bits if bits is None else bits) * self.params + self._overhead()

    def emitted_bits(self) -> int:
        """Storage in the emitted QDQ file: INT4 when grouped, else int8 whatever the bits."""
        return (4 if self.grouped else 8) * self.params + self._overhead()

    def _overhead(self) -> int:
        return self.steps * (SCALE_BITS + (0 if self.grouped else ZERO_POINT_BITS))


@dataclass(frozen=True)
class Allocation:
    """The chosen bits and how they meet the budget; ``to_dict`` is the report's mixed_precision section."""

    budget: str  # 'bits_budget' or 'size_budget_mb'
    limit: float
    candidates: tuple[int, ...]
    weights: tuple[WeightChoice, ...]
    samples: int
    seconds: float = 0.0

    @property
    def average_bits(self) -> float:
        total = sum(w.params for w in self.weights)
        return sum(w.bits * w.params for w in self.weights) / max(total, 1)

    @property
    def size_mb(self) -> float:
        return sum(w.size_bits() for w in self.weights) / MIB_BITS

    @property
    def emitted_mb(self) -> float:
        return sum(w.emitted_bits() for w in self.weights) / MIB_BITS

    def node_bits(self) -> dict[str, int]:
        return {node: w.bits for w in self.weights for node in w.nodes}

    def layer_bits(self) -> tuple[tuple[str, int], ...]:
        """The allocation as exact-name ``layer_bits`` patterns: a config with them reproduces it."""
        return tuple((exact_pattern(node), bits) for node, bits in self.node_bits().items())

    def to_dict(self) -> dict:
        return {
            "budget": {self.budget: self.limit}, "candidates": list(self.candidates),
            "average_bits": self.average_bits, "size_mb": self.size_mb, "emitted_mb": self.emitted_mb,
            "size_counting": "size_mb: 2-4 bit weights as packed INT4, 5-8 bit as int8, plus float32 scales and "
                             "per-channel int8 zero points; emitted_mb: what the QDQ file stores (int8 containers "
                             "except weight-only grouped MatMul/Gemm layers, packed INT4)",
            "sensitivity": f"relative output error of the FP32 model with one layer's weight rounded to nearest "
                           f"at each width, onnxruntime, {self.samples} calibration samples",
            "predicted_error": sum(w.sensitivity.get(w.bits, 0.0) for w in self.weights),
            "layers": [{"weight": w.weight, "nodes": list(w.nodes), "op_type": w.op_type, "params": w.params,
                        "bits": w.bits, "pinned": w.pinned,
                        "sensitivity": {str(b): s for b, s in sorted(w.sensitivity.items())}}
                       for w in self.weights],
            "layer_bits": dict(self.layer_bits()),
            "seconds": self.seconds,
        }

    def describe(self) -> str:
        counts = {b: sum(1 for w in self.weights if w.bits == b) for b in sorted({w.bits for w in self.weights})}
        spread = ", ".join(f"{n}×{b}" for b, n in counts.items())
        return (f"mixed precision: {self.average_bits:.3f} average weight bits, {self.size_mb:.4g} MiB "
                f"({self.budget} {self.limit:g}); layers at {spread} bits")


def exact_pattern(name: str) -> str:
    """An fnmatch pattern that matches ``name`` only (glob characters in brackets)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def choose_bits(plan: BlockPlan, data: CalibrationSet, config: Budgets, providers,
                progress: Progress | None = None) -> tuple[BlockPlan, Allocation]:
    """Measure the plan's layers on ``data`` and choose their bits within the config's budget;
    returns the plan with those bits (a new plan; ``plan`` is not changed) and the allocation.
    Raises ConfigError when the budget cannot be met, naming the range that can."""
    from onnxflex.sensitivity import measure, sensitivity_samples

    t0 = time.perf_counter()
    progress = progress or Progress(False)
    budget_name = "bits_budget" if config.bits_budget else "size_budget_mb"
    candidates = tuple(range(MIN_BUDGET_BITS, config.wbits + 1))
    units = weight_units(plan, config)
    widths = {u.weight: (u.bits,) if u.pinned else candidates[::-1] for u in units}
    budget = check_budget(units, widths, config)
    layer_of: dict[str, QuantLayer] = {}
    for layer in plan.layers:
        layer_of.setdefault(layer.weight, layer)
    free = {u.weight: layer_of[u.weight] for u in units if not u.pinned}
    sample = sensitivity_samples(data, plan.model)
    progress.start(sum(len(widths[w]) for w in free), "sensitivity")
    measured = measure(plan.model, free, widths, sample, config.weight_scale, providers, progress.update)
    progress.finish(f"sensitivity of {len(free)} weights at {len(candidates)} widths on "
                    f"{sample.num_samples} samples")
    units = [dataclasses.replace(u, sensitivity=measured.get(u.weight, {})) for u in units]
    options = [[(_cost(u, b, budget_name), u.sensitivity.get(b, 0.0)) for b in widths[u.weight]] for u in units]
    picks = solve(options, budget)
    if picks is None:  # check_budget makes this unreachable; kept so a bug cannot pass silently
        raise ConfigError(f"{budget_name}={getattr(config, budget_name)} cannot be met")
    units = [dataclasses.replace(u, bits=widths[u.weight][k]) for u, k in zip(units, picks)]
    allocation = Allocation(budget_name, float(getattr(config, budget_name)), candidates, tuple(units),
                            sample.num_samples, round(time.perf_counter() - t0, 3))
    log.info("%s", allocation.describe())
    return with_bits(plan, allocation.node_bits()), allocation


def weight_units(plan: BlockPlan, config: Budgets) -> list[WeightChoice]:
    """The plan's quantized weights in plan order, each with the nodes reading it; pinned when a
    ``layer_bits`` pattern names one of its nodes (the plan already gave it those bits). Layers inside
    control-flow subgraphs keep the bits the plan gave them and are not counted."""
    shapes = {t.name: tuple(t.dims) for t in plan.model.graph.initializer}
    units: dict[str, WeightChoice] = {}
    for layer in plan.layers:
        if layer.owner:
            continue
        pinned = any(fnmatch.fnmatchcase(layer.node, p) for p, _ in config.layer_bits)
        old = units.get(layer.weight)
        if old is not None:
            units[layer.weight] = dataclasses.replace(old, nodes=old.nodes + (layer.node,),
                                                      pinned=old.pinned or pinned,
                                                      bits=old.bits if old.pinned else layer.bits)
            continue
        shape = shapes[layer.weight]
        params = int(np.prod(shape, dtype=np.int64))
        k = int(shape[1 - layer.axis]) if layer.group_size else 0  # the blocked input axis; a short last group
        steps = -(-k // layer.group_size) * int(shape[layer.axis]) if layer.group_size else int(shape[layer.axis])
        units[layer.weight] = WeightChoice(layer.weight, (layer.node,), layer.op_type, params, steps,
                                           bool(layer.group_size), pinned, layer.bits)
    return list(units.values())


def check_budget(units: Sequence[WeightChoice], widths: Mapping[str, tuple[int, ...]], config: Budgets) -> int:
    """The budget in bits (floored); raises ConfigError when even the narrowest widths exceed it."""
    name = "bits_budget" if config.bits_budget else "size_budget_mb"
    lo = sum(min(_cost(u, b, name) for b in widths[u.weight]) for u in units)
    hi = sum(max(_cost(u, b, name) for b in widths[u.weight]) for u in units)
    pins = sum(1 for u in units if u.pinned)
    pinned = f", {pins} of them pinned by layer_bits" if pins else ""
    fewer = ", or pin fewer layers with layer_bits" if pins else ""
    if name == "bits_budget":
        params = sum(u.params for u in units)
        budget = math.floor(config.bits_budget * params)
        if budget < lo:
            raise ConfigError(
                f"bits_budget={config.bits_budget:g} cannot be met: the {len(units)} quantized weights{pinned} "
                f"average {_up(lo / max(params, 1))} to {hi / max(params, 1):.3f} bits with widths "
                f"{MIN_BUDGET_BITS}-{config.wbits}; give --bits-budget in that range{fewer}")
        return budget
    budget = math.floor(config.size_budget_mb * MIB_BITS)
    if budget < lo:
        raise ConfigError(
            f"size_budget_mb={config.size_budget_mb:g} cannot be met: the {len(units)} quantized weights{pinned} "
            f"take {_up(lo / MIB_BITS, 6)} to {hi / MIB_BITS:.6f} MiB (2-4 bits as INT4, 5-8 as int8, plus "
            f"scales); give --size-budget-mb in that range{fewer}")
    return budget


def solve(options: Sequence[Sequence[tuple[int, float]]], budget: int) -> list[int] | None:
    """Multiple-choice knapsack: for each group one (cost, value) option, minimising the summed value
    with the summed cost ≤ ``budget`` (non-negative integers). Returns the chosen index per group,
    or None when no choice fits.

    Dynamic programming over the cost in units of the costs' greatest common divisor: exact while
    budget / unit ≤ DP_BUCKETS; beyond, the unit grows and costs are rounded up to it, so the result
    still fits the budget (and may leave up to one unit per group unused). Ties go to the option
    listed first, then to the larger total cost.
    """
    costs = [c for opts in options for c, _ in opts]
    unit = max(math.gcd(*costs) if any(costs) else 1, -(-budget // DP_BUCKETS), 1)
    size = budget // unit + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    picked = np.zeros((len(options), size), np.int8)
    for g, opts in enumerate(options):
        new = np.full(size, np.inf)
        for k, (cost, value) in enumerate(opts):
            c = -(-cost // unit)
            if c >= size:
                continue
            shifted = np.full(size, np.inf)
            shifted[c:] = best[:size - c] + value
            better = shifted < new
            new[better] = shifted[better]
            picked[g, better] = k
        best = new
    if not np.isfinite(best).any():
        return None
    end = size - 1 - int(np.argmin(best[::-1]))
    choice = []
    for g in range(len(options) - 1, -1, -1):
        k = int(picked[g, end])
        choice.append(k)
        end -= -(-options[g][k][0] // unit)
    return choice[::-1]


def with_bits(plan: BlockPlan, bits: Mapping[str, int]) -> BlockPlan:
    """A copy of ``plan`` whose layers named in ``bits`` (node → bits) carry those bits."""
    blocks = tuple(dataclasses.replace(b, layers=tuple(dataclasses.replace(l, bits=bits.get(l.node, l.bits))
                                                       for l in b.layers)) for b in plan.blocks)
    return dataclasses.replace(plan, blocks=blocks)


def _cost(unit: WeightChoice, bits: int, budget: str) -> int:
    return bits * unit.params if budget == "bits_budget" else unit.size_bits(bits)


def _up(value: float, digits: int = 3) -> str:
    """``value`` rounded up at ``digits`` decimals, so that the printed bound is itself feasible."""
    return f"{math.ceil(value * 10 ** digits) / 10 ** digits:.{digits}f}"


__all__ = ["Allocation", "WeightChoice", "choose_bits", "container_bits", "exact_pattern", "solve", "with_bits"]
