"""The step budget: a fixed amount of optimisation work for the whole reconstruction, proportional
to the model's own cost, spent on the blocks where it helps most.

Units are FLOPs (2 per multiply-add). A weighted layer's forward FLOPs per sample are
2 × reduction depth (placement.reduction_depth) × its output elements (graph.static_shapes on one
batch); a block's are the sum of its layers'. One optimisation step of a block costs

    samples per step × (FWD_BWD × per-sample FLOPs + ACT_STEP_FLOPS × per-sample activation elements)
        + micro-batches × STEP_FIXED_FLOPS + WEIGHT_STEP_FLOPS × the block's weight elements

(forward and backward are about three forwards; STEP_FIXED_FLOPS is the per-micro-batch overhead of
the loop measured as FLOP-equivalents; WEIGHT_STEP_FLOPS is what rounding a weight value costs once
per step, fake_quant forward and backward and the optimiser's update of its parameters, which a block
with a large weight and few output positions, an 8,210-class Gemm head, spends far more on than on
its products; ACT_STEP_FLOPS is the fake-quant and element-wise work, forward and backward, on each
output element of the block's nodes, charged by step and time budgets only, as the preset's step_cap
was set without it). A block's score is its relative round-to-nearest weight error
(||W − Q_rtn(W)|| / ||W|| over its weights, on the min/max grid) × its FLOPs ÷ its step cost: what
learning can recover, per FLOP spent. ``split`` gives the blocks in score order MIN_STEPS steps
each while the budget lasts, then tops them up in proportion to score, each capped at the method's
iterations; a block given 0 steps keeps round-to-nearest weights and calibrated activation steps.

The budget is ``step_budget`` × the calibration set's FP forward FLOPs (per-sample FLOPs of every
block × the reconstruction samples), or ``time_budget`` minutes × the FLOP rate ``measure_rate``
finds on this machine (the output then depends on the machine), or, with neither, the preset's
``step_cap`` FLOPs where the full schedule (every learnable block its iterations) would cost more:
a plan within the cap runs the full schedule, as without a budget.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx

from onnxflex.runtimes.base import RECURRENT_OPS

FWD_BWD = 3  # forward + backward of one step, in forwards
STEP_FIXED_FLOPS = 15e6  # per-step overhead of the loop (launches, optimiser, indexing) as FLOP-equivalents
# FLOP-equivalents per weight value per step: FlexRound's fake_quant forward + backward of 0.15-2 M value
# weights measured 840-1,500 at measure_rate's matmul rate on one thread (an 8 M value weight: 8,000)
WEIGHT_STEP_FLOPS = 1000
# FLOP-equivalents per activation element (a block node's output value, per sample) per step, charged by
# step and time budgets: one fake-quant point and two element-wise nodes forward + backward on 0.26-4 M
# element tensors measured 1,000-2,000 at measure_rate's matmul rate on one thread (111 GFLOP/s, load 5.7);
# a block of big activations and few products (a 736x736 detector stage) spends most of its step there
ACT_STEP_FLOPS = 1000
MIN_STEPS = 20  # the fewest steps worth taking on a block: below it learning barely moves from the start
RATE_SIZE = 256  # the rate microbenchmark multiplies two RATE_SIZE² float32 matrices
RATE_SECONDS = 0.2  # ... for about this long


@dataclass(frozen=True)
class BlockCost:
    """What the split reads of one block: per-sample forward FLOPs, relative RTN weight error, the
    FLOPs of one step, ``fixed``: why the block cannot learn ('' when it can), its weight values and its
    nodes' output elements per sample (``activations``)."""

    name: str
    flops: float
    error: float
    step_flops: float
    fixed: str = ""
    weights: int = 0
    activations: float = 0.0

    @property
    def score(self) -> float:
        """Error × FLOPs per step FLOP; 0 for a block that cannot learn."""
        return 0.0 if self.fixed else self.error * self.flops / self.step_flops


@dataclass(frozen=True)
class BlockSteps:
    """One block's share: its cost record, the steps it learns and why."""

    cost: BlockCost
    steps: int
    reason: str


@dataclass(frozen=True)
class StepBudget:
    """The planned steps per block (plan order) under ``budget_flops``; ``basis`` says where the
    budget came from, ``rate`` is the measured FLOP/s for a time budget (None otherwise)."""

    budget_flops: float
    basis: str
    blocks: tuple[BlockSteps, ...]
    rate: float | None = None

    def iters_of(self, index: int) -> int:
        """The steps block ``index`` (plan order) learns."""
        return self.blocks[index].steps

    @property
    def spent_flops(self) -> float:
        return sum(b.steps * b.cost.step_flops for b in self.blocks)

    def to_dict(self) -> dict:
        """The report's ``step_budget`` section."""
        return {"budget_flops": self.budget_flops, "basis": self.basis, "spent_flops": self.spent_flops,
                "flop_rate": self.rate, "min_steps": MIN_STEPS, "step_fixed_flops": STEP_FIXED_FLOPS,
                "weight_step_flops": WEIGHT_STEP_FLOPS, "act_step_flops": ACT_STEP_FLOPS,
                "blocks": [{"name": b.cost.name, "steps": b.steps, "score": b.cost.score,
                            "flops_per_sample": b.cost.flops, "rtn_error": b.cost.error,
                            "weights": b.cost.weights,
                            "activations": b.cost.activations, "step_flops": b.cost.step_flops, "reason": b.reason}
                           for b in self.blocks]}


def step_cost(per_sample_flops: float, samples_per_step: int, micro_batches: int = 1, weights: int = 0,
              activations: float = 0.0) -> float:
    """FLOPs of one optimisation step of a block of ``per_sample_flops`` forward FLOPs per sample,
    ``weights`` weight values and ``activations`` node output elements per sample, over
    ``samples_per_step`` samples in ``micro_batches`` forward/backward passes (that share one
    fake_quant per weight)."""
    return (samples_per_step * (FWD_BWD * per_sample_flops + ACT_STEP_FLOPS * activations)
            + micro_batches * STEP_FIXED_FLOPS + WEIGHT_STEP_FLOPS * weights)


def block_activations(model: onnx.ModelProto, block, shapes: dict, batch: int) -> float:
    """Output elements per sample of ``block``'s nodes (of ``model``) whose output shape ``shapes`` knows
    (on ``batch`` samples): the values its fake-quant points and element-wise nodes touch each step."""
    names = set(block.nodes)
    outputs = {o for n in model.graph.node if n.name in names for o in n.output}
    return sum(float(np.prod(shapes[o][0], dtype=np.float64)) for o in outputs if o in shapes) / batch


def split(budget_flops: float, blocks: list[BlockCost], cap: int) -> StepBudget:
    """Steps per block (module docstring): MIN_STEPS (at most ``cap``) to the learnable blocks in
    score order while the budget lasts (a block whose first steps no longer fit is passed over for
    cheaper ones), the rest in proportion to score among those, at most ``cap`` each. The steps'
    cost never passes ``budget_flops``."""
    steps = [0] * len(blocks)
    left = budget_flops
    order = sorted((i for i, b in enumerate(blocks) if not b.fixed), key=lambda i: (-blocks[i].score, i))
    first = min(MIN_STEPS, cap)
    for i in order:
        if first * blocks[i].step_flops <= left:
            steps[i] = first
            left -= first * blocks[i].step_flops
    left = _top_up(steps, left, [i for i in order if steps[i]], blocks, cap)
    rank = {i: r for r, i in enumerate(order)}
    shares = tuple(BlockSteps(b, steps[i], _reason(b, steps[i], cap, rank.get(i), len(order)))
                   for i, b in enumerate(blocks))
    return StepBudget(float(budget_flops), "", shares)


def _top_up(steps: list[int], left: float, chosen: list[int], blocks: list[BlockCost], cap: int) -> float:
    """Mutates ``steps``: ``left`` FLOPs shared among ``chosen`` (in score order) in proportion to score,
    round after round while a share buys a step (a block at ``cap`` leaves the next rounds); what no
    share buys goes, in score order, to the blocks it still buys steps for. Returns what is left."""
    open_ = [i for i in chosen if steps[i] < cap and blocks[i].score > 0]
    while open_ and left > 0:
        pool, total = left, sum(blocks[i].score for i in open_)
        for i in open_:
            left -= _buy(steps, i, pool * blocks[i].score / total, blocks[i].step_flops, cap)
        if left == pool:
            break
        open_ = [i for i in open_ if steps[i] < cap]
    for i in open_:
        left -= _buy(steps, i, left, blocks[i].step_flops, cap)
    return left


def _buy(steps: list[int], i: int, flops: float, step_flops: float, cap: int) -> float:
    """Mutates ``steps[i]``: as many more steps as ``flops`` pays for, up to ``cap``. Returns their cost."""
    extra = max(0, min(cap - steps[i], math.floor(flops / step_flops)))
    steps[i] += extra
    return extra * step_flops


def _reason(block: BlockCost, steps: int, cap: int, rank: int | None, ranked: int) -> str:
    """Why ``block`` got ``steps``, in words."""
    if block.fixed:
        return f"{block.fixed}: keeps round-to-nearest"
    if not steps:
        return (f"the budget was spent before its first {min(MIN_STEPS, cap)} steps (score rank {rank + 1} "
                f"of {ranked}): keeps round-to-nearest")
    if steps == cap:
        return f"all {cap} steps of the method's schedule"
    return f"{steps} of {cap} steps: its share of the budget by score (rank {rank + 1} of {ranked})"


def layer_flops(model: onnx.ModelProto, layers, feed: dict[str, np.ndarray], batch: int,
                shapes: dict[str, tuple[tuple[int, ...], int]] | None = None) -> dict[str, float]:
    """Per-sample forward FLOPs of the node of each layer (QuantLayer) of ``model``, keyed by node name
    (a recurrent node's W and R layers together): 2 × reduction depth × output
    elements, the output's shape inferred with the graph inputs of ``feed`` (``batch`` samples), or
    looked up in ``shapes`` (tensor → (shape, type) on that batch, e.g. ``known_shapes``) when given.
    A recurrent layer (LSTM, GRU: W or R) multiplies
    its weight once per time step and sample: 2 × its elements × the steps of its input X. A layer
    whose shape is not known (inside a subgraph, or unknown) counts one output position (one time
    step): 2 × its weight's elements."""
    from onnxflex.graph import static_shapes
    from onnxflex.passes.select_inner import initializers_of

    shapes = static_shapes(model, feed) if shapes is None else shapes
    nodes = {n.name: n for n in model.graph.node}
    flops: dict[str, float] = {}
    for layer in layers:
        dims = list(initializers_of(model, layer)[layer.weight].dims)
        node = nodes.get(layer.node) if not layer.owner else None
        value = _node_flops(node, dims, shapes, batch)
        recurrent = layer.op_type in RECURRENT_OPS  # W and R: two layers of one node
        flops[layer.node] = flops.get(layer.node, 0.0) + value if recurrent else value
    return flops


def _node_flops(node: onnx.NodeProto | None, dims: list[int], shapes: dict, batch: int) -> float:
    """layer_flops of one weight of ``dims`` in ``node`` (None: a node inside a subgraph)."""
    from onnxflex.placement import reduction_depth

    weight = 2.0 * float(np.prod(dims, dtype=np.float64))
    if node is None:
        return weight
    if node.op_type in RECURRENT_OPS:
        x = shapes.get(node.input[0])  # [T, N, K] or [N, T, K]: T·N products per weight value
        return weight if x is None else weight * _rows(x[0]) / batch
    known = shapes.get(node.output[0])
    if known is None:
        return weight
    return 2.0 * reduction_depth(node, dims) * float(np.prod(known[0], dtype=np.float64)) / batch


def _rows(shape: tuple[int, ...]) -> float:
    """Elements of ``shape`` over its last axis (the vectors a weight multiplies)."""
    return float(np.prod(shape[:-1], dtype=np.float64))


def weight_values(model: onnx.ModelProto, layer) -> int:
    """Elements of ``layer``'s weight (its own graph's initializer)."""
    from onnxflex.passes.select_inner import initializers_of

    return int(np.prod(initializers_of(model, layer)[layer.weight].dims, dtype=np.int64))


def rtn_error(block, model: onnx.ModelProto, weight_grid: str) -> float:
    """||W − Q_rtn(W)|| / ||W|| over all of ``block``'s weights together, each on its min/max grid of its
    bits, axis and groups (0 for a block without weights)."""
    import torch

    from onnxflex.rounding.methods import make_rounder
    from onnxflex.rounding.reconstruct import layer_weight

    err = norm = 0.0
    cpu = torch.device("cpu")
    with torch.no_grad():
        for layer in block.layers:
            w = layer_weight(layer, model, cpu)
            rounder = make_rounder("rtn", w, layer.axis, layer.bits, "minmax", layer.group_size,
                                   weight_grid == "asymmetric")
            err += float(torch.sum((rounder.fake_quant() - w) ** 2))
            norm += float(torch.sum(w ** 2))
    return math.sqrt(err / norm) if norm > 0 else 0.0


def known_shapes(plan, feed: dict[str, np.ndarray], batch: int, cache=None) -> dict[str, tuple[tuple[int, ...], int]]:
    """Tensor → (shape, type) of ``plan``'s model with the graph inputs of ``feed`` (graph.static_shapes),
    plus, for each block with a layer whose shape that leaves unknown (a Reshape to a shape computed
    from data), the block's own inference (graph.block_shapes) on its captured inputs in ``cache``
    (cache.TensorCache; None: none), ``batch`` samples as in the feed."""
    from onnxflex.graph import block_shapes, static_shapes

    shapes = static_shapes(plan.model, feed)
    if cache is None:
        return shapes
    for block in _unknown_blocks(plan, shapes):
        layout = cache.layout
        feeds = {name: layout.to_model(name, np.asarray(value if layout.shared(name) else value[:batch]))
                 for name, value in cache.fp_inputs(block).items()}
        shapes = {**block_shapes(plan.model, block.nodes, feeds), **shapes}
    return shapes


def _unknown_blocks(plan, shapes: dict) -> list:
    """The blocks of ``plan`` with a layer whose shape (``_shape_tensor``) ``shapes`` leaves unknown."""
    nodes = {n.name: n for n in plan.model.graph.node}
    return [block for block in plan.blocks
            if any(_shape_tensor(nodes[layer.node]) not in shapes for layer in block.layers
                   if not layer.owner and layer.node in nodes)]


def needs_captured_shapes(plan, data) -> bool:
    """Whether block_costs on the samples ``data`` reads captured tensors (known_shapes: a layer whose
    shape the whole-model inference leaves unknown); without, the budget can be planned before capture."""
    from onnxflex.calib import fixed_batch
    from onnxflex.graph import static_shapes

    feed = data.feeds(0, fixed_batch(plan.model) or 1)
    return bool(_unknown_blocks(plan, static_shapes(plan.model, feed)))


def _shape_tensor(node: onnx.NodeProto) -> str:
    """The tensor whose shape layer_flops reads for ``node``: a recurrent node's input X, else its output."""
    return node.input[0] if node.op_type in RECURRENT_OPS else node.output[0]


def block_costs(plan, data, config, cache=None) -> list[BlockCost]:
    """BlockCost of every block of ``plan`` (blocks.BlockPlan) on the reconstruction samples ``data``
    (calib.CalibrationSet), steps of ``config.accumulate`` micro-batches of ``config.batch_size``
    samples (options.RoundingOptions); ``cache`` (the captured TensorCache, or None) gives the shapes
    inference cannot (known_shapes). Step and time budgets charge the blocks' activations
    (ACT_STEP_FLOPS); the preset's ``step_cap`` does not."""
    from onnxflex.calib import fixed_batch

    batch = fixed_batch(plan.model) or 1
    feed = data.feeds(0, batch)
    shapes = known_shapes(plan, feed, batch, cache)
    per_layer = layer_flops(plan.model, plan.layers, feed, batch, shapes)
    per_step = min(config.batch_size * config.accumulate, data.num_samples)
    sizes = {layer.weight: weight_values(plan.model, layer) for layer in plan.layers}
    costs = []
    for block in plan.blocks:
        flops = sum(per_layer[node] for node in dict.fromkeys(layer.node for layer in block.layers))
        fixed = f"no torch converter for {', '.join(block.unsupported)}" if block.unsupported else ""
        error = 0.0 if fixed else rtn_error(block, plan.model, config.weight_grid)
        weights = sum(sizes[layer.weight] for layer in block.layers)
        # the preset's step_cap is set in the units without activations: its plans stay as they were
        acts = block_activations(plan.model, block, shapes, batch) if not config.step_cap else 0.0
        costs.append(BlockCost(block.name, flops, error, step_cost(flops, per_step, config.accumulate, weights, acts),
                               fixed, weights, acts))
    return costs


def plan_budget(plan, data, config, device: str = "cpu", cache=None) -> StepBudget | None:
    """The run's StepBudget (module docstring) for ``plan`` on ``data`` under ``config``
    (options.RoundingOptions: ``step_budget``, ``time_budget``, ``step_cap``, ``iters`` as each block's
    cap; ``cache``: the captured tensors, for shapes inference cannot give); None when all three are 0,
    when the full schedule fits in ``step_cap``, or when the method learns nothing, so every block runs
    ``config.iters`` steps."""
    import dataclasses

    from onnxflex.rounding.methods import reconstructs

    if not reconstructs(config.method) or not (config.step_budget or config.time_budget or config.step_cap):
        return None
    costs = block_costs(plan, data, config, cache)
    rate = None
    if config.time_budget:
        rate = measure_rate(device)
        budget = config.time_budget * 60.0 * rate
        basis = f"time_budget {config.time_budget:g} min at the measured {rate / 1e9:.2f} GFLOP/s"
    elif config.step_budget:
        forward = sum(c.flops for c in costs) * data.num_samples
        budget = config.step_budget * forward
        basis = (f"step_budget {config.step_budget:g} x {forward:.4g} FP forward FLOPs "
                 f"({data.num_samples} samples)")
    else:
        full = full_schedule_flops(costs, config.iters)
        if full <= config.step_cap:
            return None
        budget = config.step_cap
        basis = (f"the {config.preset} preset's cap of {budget:.4g} FLOPs: its full schedule ({config.iters} "
                 f"steps a block) would cost {full:.4g}, {full / budget:.1f}x the cap")
    return dataclasses.replace(split(budget, costs, config.iters), basis=basis, rate=rate)


def full_schedule_flops(costs: list[BlockCost], iters: int) -> float:
    """FLOPs of ``iters`` steps on every block of ``costs`` that can learn."""
    return sum(iters * c.step_flops for c in costs if not c.fixed)


def measure_rate(device: str = "cpu", seconds: float = RATE_SECONDS) -> float:
    """FLOP/s of a RATE_SIZE² float32 matmul on ``device`` at torch's current threads: the best of the
    runs that fit in about ``seconds`` (at least three)."""
    import torch

    dev = torch.device(device)
    a = torch.randn(RATE_SIZE, RATE_SIZE, device=dev)
    b = torch.randn(RATE_SIZE, RATE_SIZE, device=dev)
    flops = 2.0 * RATE_SIZE ** 3
    best, runs, start = 0.0, 0, time.perf_counter()
    with torch.no_grad():
        (a @ b).sum().item()  # warm-up: first call allocates and, on CUDA, initialises
        while runs < 3 or time.perf_counter() - start < seconds:
            t = time.perf_counter()
            (a @ b).sum().item()  # .item() waits for an accelerator
            best = max(best, flops / max(time.perf_counter() - t, 1e-9))
            runs += 1
    return best


__all__ = ["ACT_STEP_FLOPS", "BlockCost", "BlockSteps", "FWD_BWD", "MIN_STEPS", "STEP_FIXED_FLOPS", "StepBudget", "WEIGHT_STEP_FLOPS",
           "block_activations", "block_costs", "full_schedule_flops", "known_shapes", "layer_flops", "measure_rate", "needs_captured_shapes", "plan_budget", "rtn_error", "split",
           "step_cost", "weight_values"]
