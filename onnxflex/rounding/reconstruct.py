"""Block reconstruction: per block, in order, learn rounding and activation steps so that the
quantized block on quantized inputs matches the FP block on FP inputs; then run the frozen block
to produce the next blocks' quantized inputs.

    minimise  Σ_outputs || block_q(x_q) − block_fp(x_fp) ||²   over rounder and step-size parameters
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Container

import numpy as np
import onnx
import torch

from onnxflex.blocks import Block, BlockPlan
from onnxflex.calib import CalibrationSet, fixed_batch
from onnxflex.cache import DiskArray, Key, TensorCache, batch_within
from onnxflex.checkpoint import Checkpoint
from onnxflex.device import threads_for, torch_threads
from onnxflex.extdata import is_offloaded, tensor_array
from onnxflex.graph import default_opset, node_attr
from onnxflex.layout import Layout
from onnxflex.options import RoundingOptions
from onnxflex.persample import apart_blocks
from onnxflex.progress import Progress
from onnxflex.passes.select import concat_ties
from onnxflex.passes.select_inner import initializers_of
from onnxflex.rounding.activation import ActQuantizer
from onnxflex.rounding.actrange import PointValues
from onnxflex.rounding.bias_correction import ChannelMeans, channel_axis, weight_shaped
from onnxflex.rounding.heap import reused_pages, trim_freed
from onnxflex.rounding.ortblock import OrtBlock
from onnxflex.rounding.methods import make_policy, make_rounder, reconstructs
from onnxflex.rounding.policies import EarlyStop
from onnxflex.rounding.rounders import FrozenRounder, Rounder
from onnxflex.rounding.torchify import BlockModule, QuantState, bias_limit
from onnxflex.runtimes.base import Target
from onnxflex.spill import file_backed

log = logging.getLogger("onnxflex")

INDEX_CHUNK = 64  # steps of minibatch indices drawn, and copied to the device, at a time
HELD_MIN = 8  # samples no step drew that are enough to check learning on data it never saw
INNER_TENSORS = 4  # a block run without gradients holds about this many of its largest tensor at a time
# When no block learns (rtn, hqq), the quantized path only reports each block's loss and feeds the next
# blocks' quantized inputs, which only those losses read: it runs on this many samples, not all.
UNLEARNED_LOSS_SAMPLES = 8
FILE_BACKED_BYTES = 1 << 20  # frozen integers at least this large go to a file-backed map (large models)


@dataclass(frozen=True)
class BlockResult:
    """``iters``: the optimisation steps the block ran (fewer than configured after an early stop);
    ``samples``: how many calibration samples the losses are over (0: not recorded)."""

    name: str
    loss_before: float
    loss_after: float
    iters: int
    seconds: float
    runtime: str = "torch"
    samples: int = 0


class BlockData:
    """A block's tensors on the compute device: FP inputs, FP targets and quantized-path inputs, samples
    on dim 0 (a shared tensor is a Shared value that every batch sees whole); on the CPU the cache's
    own arrays, not copies (nothing writes into a block's tensors; the cache replaces an entry whole).
    ``run`` calls a block module in the model's layout (``layout``: the cache's batch axes) and returns
    sample-major outputs. With ``fp_input`` the block learns on its FP inputs: ``q_inputs`` is
    ``fp_inputs`` (block_input fp)."""

    def __init__(self, block: Block, cache: TensorCache, device: torch.device, fp_input: bool = False) -> None:
        self.layout = cache.layout

        def load(name, array):
            if self.layout.shared(name):
                return Shared(torch.from_numpy(np.asarray(array)).to(device))
            if isinstance(array, DiskArray):  # spilled: read batch by batch, RAM stays bounded
                return RowReader(array, device)
            return torch.from_numpy(np.asarray(array)).to(device)

        fp_inputs = cache.fp_inputs(block)
        self.fp_inputs = {n: load(n, a) for n, a in fp_inputs.items()}
        self.fp_outputs = {n: load(n, a) for n, a in cache.fp_outputs(block).items()}
        # an input the quantized path leaves as it is is the FP entry: loaded once, shared by both
        self.q_inputs = self.fp_inputs if fp_input else \
            {n: self.fp_inputs[n] if a is fp_inputs[n] else load(n, a) for n, a in cache.q_inputs(block).items()}
        self.num_samples = cache.num_samples
        self.device = device
        self.max_bytes = cache.max_bytes
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}  # step_rows' reused batches

    def run(self, module, inputs: dict[str, torch.Tensor], observe=None) -> dict[str, torch.Tensor]:
        """``module`` on sample-major ``inputs``; its outputs sample-major."""
        feeds = {k: self.layout.to_model(k, v) for k, v in inputs.items()}
        outputs = module(feeds) if observe is None else module(feeds, observe=observe)
        return {k: self.layout.to_samples(k, v) for k, v in outputs.items()}

    def nograd_batch(self, size: int) -> int:
        """Samples per batch for the block's runs without gradients (calibration, evaluation, the
        quantized outputs): ``size``, or fewer when a batch's boundary tensors plus INNER_TENSORS of its
        largest would pass a quarter of the cache's RAM bound (a 736x736 detector's head block held
        2 GB more at 32 samples than at 8). Training batches are the method's and stay ``size``."""
        sizes = [_per_sample(t) for t in (*self.fp_inputs.values(), *self.fp_outputs.values())
                 if not isinstance(t, Shared)]
        per_sample = 4 * (sum(sizes) + INNER_TENSORS * max(sizes, default=0))
        return batch_within(size, per_sample, self.max_bytes)

    def step_rows(self, kind: str, values: dict, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """``rows(v, idx)`` of each of ``values`` (``kind``: which of the block's dicts, q or fp), a
        tensor's into the buffer its previous step used: a fresh batch-sized tensor page-faults its
        memory in anew (a detector's 39 MB batch took 0.5 s to gather on 2 cores, 2 ms into memory
        already touched). What it returns is overwritten by its next call with the same ``kind``."""
        out = {}
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                out[name] = rows(value, idx)
                continue
            shape = (len(idx),) + tuple(value.shape[1:])
            buffer = self._buffers.get((kind, name))
            if buffer is None or buffer.shape != shape or buffer.dtype != value.dtype:
                buffer = self._buffers[(kind, name)] = value.new_empty(shape)
            out[name] = torch.index_select(value, 0, idx, out=buffer)
        return out

    def largest_sample(self) -> int:
        """Values per sample of the block's largest input or output."""
        return max(_per_sample(t) for t in (*self.fp_inputs.values(), *self.fp_outputs.values()))


def _per_sample(tensor) -> int:
    """Values of one sample of a block tensor (a Shared value: all of it)."""
    return int(np.prod(tensor.shape if isinstance(tensor, Shared) else tensor.shape[1:], dtype=np.int64))


class Shared:
    """A tensor with one value for every sample: indexing it with any batch index returns it whole."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value, self.shape = value, value.shape

    def __getitem__(self, index) -> torch.Tensor:
        return self.value


class RowReader:
    """A spilled cache entry as BlockData hands it out: indexing dim 0 with a slice or an index tensor
    reads just those samples from disk and returns them as a tensor on ``device``."""

    def __init__(self, array: DiskArray, device: torch.device) -> None:
        self.array, self.device = array, device
        self.shape = torch.Size(array.shape)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return torch.from_numpy(self.array[index]).to(self.device)


def add_block_quantizers(block: Block, model: onnx.ModelProto, state: QuantState, target: Target,
                         config: RoundingOptions, method: str, device: torch.device,
                         ready: dict[str, Rounder] | None = None) -> None:
    """Mutates ``state``: a rounder per layer weight (inner layers' weights read from their subgraph),
    an activation quantizer per act point (inner points too), and for a layer whose int32 bias follows
    its weight's rounding (rounding/bias_correction.py) its input's channel axis in ``bias_axes``.
    ``ready``: rounders of ``method`` built already (block_rounders, in a worker), by weight name; a
    layer whose weight is there takes it (moved to ``device``) instead of building its own."""
    nodes = {n.name: n for n in model.graph.node} if any(l.op_type == "Gemm" for l in block.layers) else {}
    for layer in block.layers:
        inits = initializers_of(model, layer)
        built = (ready or {}).get(layer.weight)
        if built is not None:
            state.rounders[layer.weight] = built.to(device)
            w = state.rounders[layer.weight].weight
        else:
            w = layer_weight(layer, model, device)
            state.rounders[layer.weight] = layer_rounder(method, layer, w, config)
        if layer.bias and target.int32_bias and config.abits:
            state.int32_biases[layer.bias] = (layer.weight, layer.input)
            b = tensor_array(inits[layer.bias], model).astype(np.float32)
            state.bias_values[layer.bias] = torch.from_numpy(b).to(device)
            state.bias_limits[layer.bias] = bias_limit(w, layer.axis)
            trans_a = layer.op_type == "Gemm" and bool(node_attr(nodes[layer.node], "transA", 0))
            axis = None if layer.owner else channel_axis(layer.op_type, layer.bits, trans_a)
            if axis is not None:
                state.bias_axes[layer.bias] = axis
    ties = concat_ties(model) if target.shared_concat_scales else {}
    for point in block.all_points:
        partner = next((p for p in state.acts if p != point and point in ties and ties.get(p) == ties[point]), None)
        state.acts[point] = state.acts[partner] if partner else \
            ActQuantizer(config.abits, target.act_symmetric).to(device)


def block_rounders(block: Block, model: onnx.ModelProto, config: RoundingOptions) -> dict[str, Rounder]:
    """The rounders of ``config``'s method for the block's layer weights, on the CPU, by weight name:
    what add_block_quantizers builds from the weights alone (the step search, HQQ's fit), so that a
    worker can build them for a later block while this one learns (workers.PipelinedRunner)."""
    cpu = torch.device("cpu")
    return {layer.weight: layer_rounder(config.method, layer, layer_weight(layer, model, cpu), config)
            for layer in block.layers}


def layer_rounder(method: str, layer, weight: torch.Tensor, config: RoundingOptions) -> Rounder:
    """The rounder of ``method`` for ``layer``'s ``weight``: its axis, bits and group, the config's step
    search and weight grid."""
    return make_rounder(method, weight, layer.axis, layer.bits, config.weight_scale, layer.group_size,
                        config.weight_grid == "asymmetric")


def layer_weight(layer, model: onnx.ModelProto, device: torch.device) -> torch.Tensor:
    """The float32 weight of ``layer`` (its own graph's initializer) on ``device``."""
    init = initializers_of(model, layer)[layer.weight]
    values = tensor_array(init, model)
    if values.dtype != np.float32 or not values.flags.writeable:  # an inline tensor's view of its proto
        values = values.astype(np.float32)
    return torch.from_numpy(values).to(device)


def keep_untaken_rtn(module: BlockModule, model: onnx.ModelProto, config: RoundingOptions,
                     device: torch.device) -> list[str]:
    """Mutates ``module`` and its state: the layers of an If branch the calibration run never took
    (``module.ran``) get round-to-nearest rounders and leave the learned set, so nothing (a
    regularizer, a shared step policy) moves weights no data reached. Returns their node names."""
    untaken = [l for l in module.block.layers if l.owner in module.branches
               and (l.owner, l.graph) not in module.ran]
    for layer in untaken:
        module.state.rounders[layer.weight] = layer_rounder("rtn", layer, layer_weight(layer, model, device), config)
    names = {l.weight for l in untaken}
    module.own_rounders = torch.nn.ModuleList(module.state.rounders[l.weight] for l in module.block.layers
                                              if l.weight not in names)
    return [l.node for l in untaken]


@torch.no_grad()
def calibrate_activations(module, data: BlockData, config: RoundingOptions, seed: int,
                          heads: Container[str] = (), observed: dict[str, PointValues] | None = None) -> list[str]:
    """Initialise each act point's step from the FP block run on FP inputs, by ``config.act_scale``
    (rounding/actrange.py: what is kept of the values, and the percentile range), and the input means
    of the block's layers whose int32 bias is corrected (``state.bias_means``); with ``observed``
    (act point → its quantizer's values from the capture run: rounding/actcapture.py) the ranges come
    from those and the block is not run, unless they do not pool the points as their quantizers do or
    a layer's bias is corrected (its input means come from the block's run). A point in ``heads``
    (a head's output: BlockPlan.head_points) whose values all lie below 0 gets its range
    mirrored about 0: the calibration data showed one decision only (no speech, no positive class),
    and the unmirrored range would clip the other at the threshold. A point the data
    never reaches (inside an If branch never taken) has no values: its quantizer is disabled (the
    tensor stays float, and so does the int32 bias of a layer reading it). Returns those points."""
    acts = module.state.acts
    points = [p for p in module.block.all_points if p in acts]
    if not points:
        return []
    state = module.state
    corrected = [l for l in module.block.layers if l.bias in state.bias_axes]
    pooled = None if corrected else _pooled(acts, points, observed)
    if pooled is None:
        means = ChannelMeans({l.input: state.bias_axes[l.bias] for l in corrected})
        pooled = _observed_run(module, data, config, seed, points, means)
        for layer in corrected:
            mean = means.mean(layer.input)
            rounder = state.rounders[layer.weight]
            shaped = None if mean is None else weight_shaped(mean.to(rounder.weight.device), rounder.weight,
                                                             rounder.axis)
            if shaped is not None:
                state.bias_means[layer.bias] = shaped
    unseen = [p for p in points if p not in pooled[id(acts[p])].sizes]
    for name in unseen:
        acts[name].enabled = False
    tied: dict[int, list[str]] = {}  # points sharing one quantizer calibrate on their joint values
    for name in points:
        if name not in unseen:
            tied.setdefault(id(acts[name]), []).append(name)
    gen = torch.Generator().manual_seed(seed)
    for key, names in tied.items():
        mirror = pooled[key].below_zero and any(n in heads for n in names)
        if mirror:
            log.info("%s: a head output whose calibration values all lie below 0 (%.4g to %.4g); its range "
                     "is mirrored about 0 so that the other side is not clipped", names[0], pooled[key].lo,
                     pooled[key].hi)
        _calibrate_point(acts[names[0]], pooled[key], names, config.act_scale, gen, mirror)
    return unseen


def _pooled(acts: dict, points: list[str], observed: dict[str, PointValues] | None) -> dict | None:
    """Quantizer id → the capture run's values of its points, or None (no observations, or ones that do
    not pool the points as their quantizers do)."""
    if observed is None or any(p not in observed for p in points):
        return None
    pairs = {(id(acts[p]), id(observed[p])) for p in points}  # one to one, or the pooling differs
    if len(pairs) != len({q for q, _ in pairs}) or len(pairs) != len({v for _, v in pairs}):
        return None
    return {id(acts[p]): observed[p] for p in points}


@torch.no_grad()
def probe_run(module, data: BlockData, size: int) -> None:
    """The FP block on its first ``size`` samples, for what a converter refuses only when it runs (an
    attribute it does not support raises NotImplementedError): a block whose act ranges come from the
    capture run is not otherwise run before it learns."""
    module.quantize = False
    try:
        data.run(module, next(_batches(data.fp_inputs, data.num_samples, size)))
    finally:
        module.quantize = True


def _observed_run(module, data: BlockData, config: RoundingOptions, seed: int, points: list[str],
                  means: ChannelMeans) -> dict:
    """Quantizer id → its points' values (PointValues) from the FP block run on FP inputs over every sample;
    mutates ``means``: the channel means of the tensors it follows, block inputs included."""
    acts = module.state.acts
    wanted = set(points)
    size = data.nograd_batch(config.batch_size)
    batches = -(-data.num_samples // size)
    pooled = {id(acts[p]): PointValues(batches, keep_sample=config.act_scale == "mse") for p in points}
    thin = torch.Generator().manual_seed(seed + 1)

    def observe(name, value):
        if name not in data.fp_inputs:
            means.add(name, value)
        if name in wanted:
            rows = value.shape[data.layout.axis(name)] if not data.layout.shared(name) and value.ndim else 1
            flat = value.detach().reshape(-1).float().cpu().numpy()
            pooled[id(acts[name])].add(name, flat, rows, data.num_samples, thin)

    module.quantize = False
    for batch in _batches(data.fp_inputs, data.num_samples, size):
        for name, value in batch.items():
            means.add(name, data.layout.to_model(name, value))
        data.run(module, batch, observe=observe)
    module.quantize = True
    return pooled


def _calibrate_point(act: ActQuantizer, values: PointValues, names: list[str], search: str,
                     gen: torch.Generator, mirror: bool = False) -> None:
    """Mutates ``act``: its step and zero point from ``values`` (of the points ``names``) by ``search``;
    with ``mirror``, over the range widened to [-m, m], m its largest magnitude."""
    percentile = search == "percentile"
    lo, hi = values.percentile_range(act.signed) if percentile else (values.lo, values.hi)
    if mirror:
        lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
    act.calibrate(lo, hi, None if percentile else values.sample(names, gen), "minmax" if percentile else search)


def _batches(tensors: dict[str, torch.Tensor], n: int, size: int):
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in tensors.items()}


def block_loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = [torch.mean((out[k] - target[k]) ** 2) for k in target if target[k].is_floating_point()]
    return torch.stack(losses).sum()


def fixed_weights(module):
    """``module.fixed_weights()`` for a BlockModule (one fake_quant per weight for a whole loop over
    batches); an OrtBlock's weights are fixed in its session already."""
    return module.fixed_weights() if isinstance(module, BlockModule) else contextlib.nullcontext()


@torch.no_grad()
def evaluate(module, data: BlockData, batch: int) -> float:
    """The block loss of the quantized path against the FP outputs over all samples, ``batch`` at a time."""
    return _mean_loss(module, data, [slice(start, start + batch) for start in range(0, data.num_samples, batch)])


@torch.no_grad()
def evaluate_rows(module, data: BlockData, indices: torch.Tensor, batch: int) -> float:
    """``evaluate`` on the samples ``indices`` (int64, dim 0) only."""
    indices = indices.to(data.device)
    return _mean_loss(module, data, [indices[start:start + batch] for start in range(0, len(indices), batch)])


def _mean_loss(module, data: BlockData, parts: list) -> float:
    """The sample-weighted mean block loss over ``parts`` (slices or index tensors of dim 0)."""
    total, count = 0.0, 0
    with fixed_weights(module):
        for part in parts:
            pick = (lambda v: v[part]) if isinstance(part, slice) else (lambda v: rows(v, part))
            size = len(range(data.num_samples)[part]) if isinstance(part, slice) else len(part)
            inputs = {k: pick(v) for k, v in data.q_inputs.items()}
            target = {k: pick(v) for k, v in data.fp_outputs.items()}
            total += float(block_loss(data.run(module, inputs), target)) * size
            count += size
    return total / count


@reused_pages()  # freed step tensors stay in the process: steps stop page-faulting (rounding/heap.py)
def train(module: BlockModule, data: BlockData, config: RoundingOptions, seed: int, progress: Progress) -> int:
    """Minimise the block loss plus the rounders' regularizer over random minibatches of the block's
    samples, with the method's step policy (Adam + cosine decay unless the rounder names another),
    for ``config.iters`` steps or until the loss plateaus (``config.early_stop``). A step sums the
    gradients of ``config.accumulate`` micro-batches (each loss / accumulate; the regularizer once), with
    one fake_quant per weight for all of them (BlockModule.step_weights), and reports their mean loss.
    Returns the steps run. The module is in training mode only inside this loop (AdaRound rounds
    softly there)."""
    policy = make_policy(config.method, list(module.own_rounders), module.learnable(), config)
    if policy is None:
        return 0
    stop = EarlyStop(policy, config.early_stop)
    batch = min(config.batch_size, data.num_samples)
    steps = 0
    module.train()
    try:
        groups = step_groups(seed, data.num_samples, batch, config.iters, config.accumulate, data.device)
        for it, group in enumerate(groups):
            policy.zero_grad()
            penalty = policy.penalty(it)
            with module.step_weights() if len(group) > 1 else contextlib.nullcontext():
                losses = [step_backward(module, data, idx, len(group), penalty if k == 0 else 0.0)
                          for k, idx in enumerate(group)]
            value = sum(losses) / len(losses)
            policy.step(it, value)
            progress.update(it + 1, f"loss {value:.3g}")
            steps = it + 1
            if stop.update(it, value):
                break
        policy.finish()
    finally:
        module.eval()
    return steps


def step_backward(module: BlockModule, data: BlockData, idx: torch.Tensor, accumulate: int,
                  extra: torch.Tensor | float = 0.0) -> float:
    """Forward and backward of the micro-batch ``idx`` (sample indices): adds the gradients of its block
    loss / ``accumulate``, plus ``extra`` (the step's regularizer), to the parameters' ``.grad``.
    Returns its block loss."""
    out = data.run(module, data.step_rows("q", data.q_inputs, idx))
    loss = block_loss(out, data.step_rows("fp", data.fp_outputs, idx))
    scaled = loss if accumulate == 1 else loss / accumulate  # one micro-batch: the plain loss's gradient
    (scaled + extra).backward()
    return loss.item()


def rows(values, idx: torch.Tensor) -> torch.Tensor:
    """``values[idx]`` along dim 0; a tensor through index_select (the same copy, several times faster
    on the CPU than advanced indexing), a Shared or RowReader by its own indexing."""
    return values.index_select(0, idx) if isinstance(values, torch.Tensor) else values[idx]


def step_groups(seed: int, n: int, batch: int, steps: int, accumulate: int, device: torch.device):
    """Each step's micro-batches: a list of ``accumulate`` [batch] index tensors, consecutive draws of
    ``step_indices`` (accumulate 1 draws exactly what step_indices does, one micro-batch per step)."""
    draws = step_indices(seed, n, batch, steps * accumulate, device)
    for _ in range(steps):
        yield [next(draws) for _ in range(accumulate)]


def unseen_rows(seed: int, n: int, batch: int, config: RoundingOptions, steps: int) -> torch.Tensor | None:
    """The sample indices (sorted int64) that none of the first ``steps`` steps of ``train``'s draws
    (``step_groups`` over ``config.iters`` steps of ``config.accumulate`` micro-batches) drew, or None
    as soon as fewer than HELD_MIN remain undrawn: it stops drawing there, so its cost is bounded by
    the draws that cover the samples, not by ``steps``."""
    drawn = torch.zeros(n, dtype=torch.bool)
    undrawn = n
    groups = step_groups(seed, n, batch, config.iters, config.accumulate, torch.device("cpu"))
    for _, group in zip(range(steps), groups):
        for idx in group:
            fresh = idx.unique()
            undrawn -= int((~drawn[fresh]).sum())
            drawn[fresh] = True
        if undrawn < HELD_MIN:
            return None
    return None if undrawn < HELD_MIN else torch.nonzero(~drawn).reshape(-1)


def step_indices(seed: int, n: int, batch: int, steps: int, device: torch.device):
    """Each step's sample indices, [batch] int64 on ``device``: the sequence of one torch.randint per
    step on a CPU generator seeded with ``seed``, drawn INDEX_CHUNK steps at a time so that an
    accelerator gets one copy per chunk instead of one per step."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, steps, INDEX_CHUNK):
        yield from torch.randint(0, n, (min(INDEX_CHUNK, steps - start), batch), generator=gen).to(device)


@torch.no_grad()
def store_quantized_outputs(module, data: BlockData, cache: TensorCache, batch: int, samples: int,
                            scored: int | None = None) -> float:
    """Run the frozen block on the quantized path over the first ``samples`` calibration samples and keep
    its outputs (and quantized graph inputs), batch by batch into the cache as entries of ``samples``
    rows (it spills to disk beyond its RAM bound). Returns the block loss of the first ``scored`` of
    those outputs (default: all) against the FP outputs, as ``evaluate`` computes it: a block that does
    not learn reads only that many FP rows (BlockRunner.loss_samples)."""
    n = min(samples, data.num_samples)
    scored = n if scored is None else min(scored, n)
    total = 0.0
    with fixed_weights(module):
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            inputs = {k: v[start:stop] for k, v in data.q_inputs.items()}
            outputs = dict(data.run(module, inputs))
            if start < scored:
                end = min(stop, scored)
                target = {k: v[start:end] for k, v in data.fp_outputs.items()}
                kept = outputs if end == stop else \
                    {k: v if data.layout.shared(k) else v[:end - start] for k, v in outputs.items()}
                total += float(block_loss(kept, target)) * (end - start)
            values = dict(outputs)
            values.update({name: module.state.acts[name](inputs[name]) for name in module.input_points})
            for name, value in values.items():
                cache.write(Key.q(name), start, value.cpu().numpy(), total=n)
    return total / scored


def reconstruct(plan: BlockPlan, cache: TensorCache, state: QuantState, target: Target, config: RoundingOptions,
                device: torch.device, progress: Progress, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                checkpoint: Checkpoint | None = None, budget=None, observers=None,
                runners=None) -> tuple[list[BlockResult], list]:
    """The block loop. Mutates ``state`` (adds and trains quantizers) and ``cache`` (adds q: tensors);
    returns each block's result and its frozen module (a BlockModule, or an OrtBlock for blocks with
    ops the torch side cannot express). With ``checkpoint``, blocks saved there are restored instead
    of learned, and each newly finished block is saved. ``budget`` (budget.StepBudget, or None: every
    block ``config.iters``) gives each block's steps. ``runners`` (workers.spread: fp block input as
    jobs, in this process or in workers) makes the runner the loop calls from the BlockRunner and the
    checkpoint, as a context manager; None: the BlockRunner, behind the checkpoint when there is one."""
    runner = BlockRunner(plan, cache, state, target, config, device, providers, budget, observers)
    results, modules = [], []
    dead = dead_after(plan)
    # calibration and quantized-output runs reuse freed pages too, not only the learning steps; a model
    # whose weights stay on disk gives the weight-sized temporaries of learning back (heap.BOUNDED). Round
    # to nearest holds none across steps: bounded, its loop on the 1.41 GiB decoder took 33 s, not 16
    bounded = is_offloaded(plan.model) and reconstructs(config.method)
    with reused_pages(bounded=bounded), (runners or checkpointed)(runner, checkpoint) as runner:
        for index, block in enumerate(plan.blocks):
            module, result = runner.run(index, block, progress)
            results.append(result)
            modules.append(module)
            cache.release(dead[index])  # their pages go to the next blocks' q: rows instead of fresh ones
    return results, modules


@contextlib.contextmanager
def checkpointed(runner: BlockRunner, checkpoint: Checkpoint | None):
    """The block loop's runner without workers: ``runner``, behind ``checkpoint`` when one is given."""
    yield runner if checkpoint is None else CheckpointedRunner(runner, checkpoint)


def learning_blocks(plan: BlockPlan, config: RoundingOptions, budget=None) -> list[int]:
    """The indices of the blocks that learn: ``config``'s method reconstructs, the block has a torch
    converter for every node and steps (``budget``'s share, budget.StepBudget; None: ``config.iters``)."""
    if not reconstructs(config.method):
        return []
    return [i for i, b in enumerate(plan.blocks) if block_steps(config, budget, i) > 0 and not b.unsupported]


def block_steps(config: RoundingOptions, budget, index: int) -> int:
    """The steps block ``index`` learns: ``budget``'s share (budget.StepBudget), else ``config.iters``."""
    return config.iters if budget is None else budget.iters_of(index)


def dead_after(plan: BlockPlan) -> list[list[str]]:
    """For each block of ``plan``, the tensors that it is the last block to read or write (as an input
    or output): after it no block loads their cached FP or q: rows. On a machine whose fresh memory
    faults in slowly, the q: rows of the later blocks then reuse their pages (a YOLOX detector's 64
    samples: 0.8 GB fewer fresh bytes, 2.5 → 1.9 GB peak resident)."""
    last: dict[str, int] = {}
    for index, block in enumerate(plan.blocks):
        for name in (*block.inputs, *block.outputs):
            last[name] = index
    dead: list[list[str]] = [[] for _ in plan.blocks]
    for name, index in last.items():
        dead[index].append(name)
    return dead


class BlockRunner:
    """What every block of one reconstruction shares, and the steps that take one block from its
    cached tensors to its frozen module: build (quantizers, module, calibration), learn, freeze, store
    its quantized outputs for the next block; or resume it from a checkpoint's saved state.

    Mutates ``state`` (adds, trains and freezes quantizers) and ``cache`` (adds q: tensors). Blocks
    must be run in plan order: each reads the q: tensors of the blocks before it. ``budget``
    (budget.StepBudget or None) sets each block's steps (``iters_of``).
    """

    def __init__(self, plan: BlockPlan, cache: TensorCache, state: QuantState, target: Target,
                 config: RoundingOptions, device: torch.device, providers: tuple[str, ...], budget=None,
                 observers=None) -> None:
        self.plan, self.cache, self.state, self.target = plan, cache, state, target
        self.config, self.device, self.providers, self.budget = config, device, providers, budget
        self.observers = observers  # rounding/actcapture.CaptureObservers: act ranges from the capture run
        self.sizes = _initializer_sizes(plan.model)
        # a model whose weights stay on disk keeps its frozen integers on disk too (spill.file_backed):
        # held in RAM they would grow with the model, a quarter of its float size at one byte each
        self.offloaded = is_offloaded(plan.model)
        self.file_backed = self.offloaded and device.type == "cpu"
        # a block learns on its inputs' q: rows of every sample; after the last block that learns, the
        # quantized path only reports each block's loss, which needs only a few samples
        self.learners = set(learning_blocks(plan, config, budget))
        self.last_learner = max(self.learners, default=-1)
        self.head_feeders = head_feeders(plan)
        # on a fixed-batch model, the blocks whose step micro-batches can run as one batch (persample.py)
        self.apart = apart_blocks(plan, cache.layout) if config.accumulate > 1 else set()
        self.ready: dict[str, Rounder] = {}  # rounders workers built ahead (workers.PipelinedRunner), by weight

    def rounding_of(self, block: Block, module=None) -> RoundingOptions:
        """The options ``block`` runs with: the run's, or for a block that computes each sample apart on a
        fixed-batch model (``apart``) its steps' micro-batches as one batch of as many samples (the same
        samples, loss and gradient, fewer and larger runs), which its other runs take as their batch too;
        not where ``module`` is an OrtBlock: onnxruntime holds the extracted subgraph to the model's batch."""
        config = self.config
        if block.name not in self.apart or isinstance(module, OrtBlock):
            return config
        return config.replace(batch_size=config.batch_size * config.accumulate, accumulate=1)

    def iters_of(self, index: int) -> int:
        """The steps block ``index`` learns (block_steps)."""
        return block_steps(self.config, self.budget, index)

    def path_samples(self, index: int) -> int:
        """The samples block ``index``'s quantized path runs on (its q: rows): all of them up to the last
        block that learns (its inputs are the earlier blocks' q: rows), UNLEARNED_LOSS_SAMPLES after it
        (a method that learns nothing, or blocks a step budget gives no steps: only their reported
        losses read them; the emitted weights and steps are the same either way)."""
        n = self.cache.num_samples
        return n if index <= self.last_learner else min(UNLEARNED_LOSS_SAMPLES, n)

    def loss_samples(self, index: int) -> int:
        """The samples block ``index``'s reported loss is over: all of them for a block that learns (its
        loss judges the learning), else UNLEARNED_LOSS_SAMPLES: nothing reads it but the report, and
        capture then stores that many FP rows of its outputs (actcapture.stored_rows)."""
        n = self.cache.num_samples
        return n if index in self.learners else min(UNLEARNED_LOSS_SAMPLES, n)

    def run(self, index: int, block: Block, progress: Progress) -> tuple[BlockModule | OrtBlock, BlockResult]:
        """Block ``index`` quantized, learned and frozen; its progress line finished."""
        module, result = self.quantize(index, block, progress)
        progress.finish(self.summary(index, result))
        return module, result

    def quantize(self, index: int, block: Block, progress: Progress) -> tuple[BlockModule | OrtBlock, BlockResult]:
        """Block ``index`` built, learned (unless its method does not reconstruct or it runs in
        onnxruntime), frozen, and its quantized outputs stored; its result's ``seconds`` count from the
        loading of its tensors."""
        started = time.perf_counter()
        with self.loaded(block) as data:
            seed = self.config.seed * 1000 + index
            module = self.build(index, block, data, seed)
            iters = self.iters_of(index)
            learns = isinstance(module, BlockModule) and reconstructs(self.config.method) and iters > 0
            progress.start(iters if learns else 0, f"{block.name} ({index + 1}/{len(self.plan.blocks)})")
            before, steps = self.learn(module, data, seed, progress, iters, index in self.head_feeders) \
                if learns else (None, 0)
            self.freeze(module, block)
            after = self.store(module, data, index)
        trim_freed()  # a block with big weights leaves a fragmented free heap behind (rounding/heap.py)
        if before is None:  # nothing changed the block: the loss before is the loss after
            before = after
        runtime = "torch" if isinstance(module, BlockModule) else "onnxruntime"
        return module, BlockResult(block.name, before, after, steps, time.perf_counter() - started, runtime,
                                   self.loss_samples(index))

    def store(self, module: BlockModule | OrtBlock, data: BlockData, index: int) -> float:
        """store_quantized_outputs of block ``index`` over its ``path_samples``; returns the block loss on
        its ``loss_samples``. A torch block that learns nothing before the last one that does runs its
        emitted subgraph in onnxruntime there (OrtBlock, on the frozen state): all samples go through it,
        and onnxruntime's integer kernels compute what the emitted model will, several times faster than
        the float convolutions of the fake-quantized torch block; not for a model whose weights stay on disk,
        whose session would hold a copy of the block's weights beside the bounded run's."""
        block = self.plan.blocks[index]
        if isinstance(module, BlockModule) and index not in self.learners and index < self.last_learner \
                and not self.offloaded:
            module = OrtBlock(block, self.plan.model, self.state, self.target, self.providers, self.device)
        batch = data.nograd_batch(self.rounding_of(block, module).batch_size)
        return store_quantized_outputs(module, data, self.cache, batch, self.path_samples(index),
                                       self.loss_samples(index))

    def summary(self, index: int, result: BlockResult) -> str:
        """Block ``index``'s progress line: its loss before and after (and on how many samples, when not
        all), and an early stop against its own steps."""
        iters = self.iters_of(index)
        stopped = f" (loss plateaued: {result.iters} of {iters} steps)" if 0 < result.iters < iters else ""
        on = f" (on {result.samples} of {self.cache.num_samples} samples)" \
            if 0 < result.samples < self.cache.num_samples else ""
        return f"{result.name}: loss {result.loss_before:.4g} -> {result.loss_after:.4g}{on}{stopped}"

    @contextlib.contextmanager
    def loaded(self, block: Block):
        """The block's tensors on the device (BlockData), with torch's threads sized for its largest
        tensor while the block computes."""
        data = BlockData(block, self.cache, self.device, self.config.block_input == "fp")
        largest = max([self.rounding_of(block).batch_size * data.largest_sample()]
                      + [self.sizes.get(l.weight, 0) for l in block.layers])
        with torch_threads(threads_for(largest, self.device, self.config.threads)):
            yield data

    def build(self, index: int, block: Block, data: BlockData, seed: int) -> BlockModule | OrtBlock:
        """A calibrated BlockModule, or an OrtBlock with RTN weights when a node has no torch converter
        (or its converter rejects an attribute); block ``index``'s act ranges from the capture run where
        ``observers`` holds them."""
        observed = self.observers.of(index) if self.observers is not None else None
        problem = f"no torch converter for {', '.join(block.unsupported)}" if block.unsupported else ""
        if not problem:
            self._add_quantizers(block, self.config.method)
            module = BlockModule(block, self.plan.model, default_opset(self.plan.model), self.state, self.device)
            try:
                if observed is not None:
                    probe_run(module, data, fixed_batch(self.plan.model) or 1)
                unseen = calibrate_activations(module, data, self.rounding_of(block), seed, self.plan.head_points,
                                               observed)
                untaken = keep_untaken_rtn(module, self.plan.model, self.config, self.device)
                _warn_not_reached(block, unseen, untaken)
                make_room_for_biases(block, self.state)
                settle_biases(block, self.state)
                return module
            except NotImplementedError as exc:
                problem = str(exc)
        log.warning("%s: %s; its weights fall back to round-to-nearest and the block runs in onnxruntime — "
                    "exclude its nodes with --exclude-node to keep them in float instead", block.name, problem)
        self._add_quantizers(block, "rtn")
        module = OrtBlock(block, self.plan.model, self.state, self.target, self.providers, self.device)
        _warn_not_reached(block, calibrate_activations(module, data, self.rounding_of(block, module), seed,
                                                       self.plan.head_points, observed))
        make_room_for_biases(block, self.state)
        settle_biases(block, self.state)
        return module

    def learn(self, module: BlockModule, data: BlockData, seed: int, progress: Progress,
              iters: int, resettle: bool = False) -> tuple[float, int]:
        """Trains the block's rounders and activation steps for at most ``iters`` steps (its schedule
        spans them); (loss before, steps run). Learning is undone, with a warning, keeping the
        round-to-nearest start, when it does not end at a loss <= the one it started from (a higher
        loss, or NaN), or when it raises the loss on the samples no step drew (``held_out_rose``; only
        where at least HELD_MIN were never drawn). With ``resettle`` (a block that feeds a head layer:
        ``head_feeders``) a corrected bias (rounding/bias_correction.py), fixed at its start's value
        while the block learns, is corrected again for the learned rounding (QuantState.resettle_bias)
        before the learned loss is taken, so that both checks judge the bias that is emitted; undone
        learning restores the start's bias too."""
        config = self.rounding_of(module.block)
        batch = data.nograd_batch(config.batch_size)
        before = evaluate(module, data, batch)
        start = [p.detach().clone() for params, _ in module.learnable() for p in params]
        settled = {l.bias: self.state.bias_values[l.bias] for l in module.block.layers
                   if resettle and l.bias in self.state.settled_means}
        config = config if iters == config.iters else config.replace(iters=iters)
        steps = train(module, data, config, seed, progress)
        for bias in settled:
            self.state.resettle_bias(bias)
        after = evaluate(module, data, batch)
        if not after <= before:
            _restore(module, start)
            self.state.bias_values.update(settled)
            log.warning("%s: learning ended at loss %.4g, not below its start %.4g; kept the round-to-nearest "
                        "start", module.block.name, after, before)
        elif self.held_out_rose(module, data, seed, steps, start, config, settled):
            _restore(module, start)
            self.state.bias_values.update(settled)
        return before, steps

    def held_out_rose(self, module: BlockModule, data: BlockData, seed: int, steps: int,
                      start: list[torch.Tensor], config: RoundingOptions,
                      settled: dict[str, torch.Tensor] | None = None) -> bool:
        """True (with a warning naming the block) when the block loss on the samples that none of the
        ``steps`` steps of ``config``'s schedule drew (``unseen_rows``) is higher with the learned
        parameters than with ``start`` (and the corrected biases ``settled``, bias → its value at the
        start); False when fewer than HELD_MIN were never drawn. ``module``'s parameters and the
        biases are as learned on return."""
        batch = min(config.batch_size, data.num_samples)
        held = unseen_rows(seed, data.num_samples, batch, config, steps)
        if held is None:
            return False
        size = data.nograd_batch(config.batch_size)
        learned = [p.detach().clone() for params, _ in module.learnable() for p in params]
        learned_biases = {b: self.state.bias_values[b] for b in settled or {}}
        after = evaluate_rows(module, data, held, size)
        _restore(module, start)
        self.state.bias_values.update(settled or {})
        before = evaluate_rows(module, data, held, size)
        _restore(module, learned)
        self.state.bias_values.update(learned_biases)
        if after <= before:
            return False
        log.warning("%s: learning raised the loss on the %d samples no step drew from %.4g to %.4g; kept the "
                    "round-to-nearest start", module.block.name, len(held), before, after)
        return True

    def freeze(self, module: BlockModule | OrtBlock, block: Block) -> None:
        """Mutates ``state`` and ``module``: the block's rounders become FrozenRounders of their exported
        integers, and the float weights the module kept for calibration are dropped. Later blocks, the
        simulation and a resumed run all see the same integers, and memory keeps int8 weights only."""
        for layer in block.layers:
            exported = self.state.rounders[layer.weight].export()
            if self.file_backed and exported.ints.nbytes >= FILE_BACKED_BYTES:
                exported = dataclasses.replace(exported, ints=file_backed(exported.ints))
            self.state.rounders[layer.weight] = FrozenRounder(exported, self.device)
            self.state.settled_means.pop(layer.bias, None)  # final: what the block learned, or its start
        if isinstance(module, BlockModule):
            module.own_rounders = torch.nn.ModuleList(self.state.rounders[l.weight] for l in block.layers)
            for layer in block.layers:
                module.constants.pop(layer.weight, None)

    def resume(self, index: int, block: Block, saved: dict, store: bool = True) -> BlockModule | OrtBlock:
        """A finished block rebuilt from its checkpoint (``Checkpoint.load``): frozen weights and restored
        activation steps; its quantized outputs stored again for the next block, unless not ``store``
        (block_input fp: no block reads them)."""
        with self.loaded(block) if store else contextlib.nullcontext() as data:
            runtime = saved["result"]["runtime"]
            self._add_quantizers(block, "rtn" if runtime == "onnxruntime" else self.config.method)
            for name, weight in saved["weights"].items():
                self.state.rounders[name] = FrozenRounder(weight, self.device)
            for name, act in saved["acts"].items():
                self.state.acts[name].load_state_dict(act["state"])
                self.state.acts[name].enabled = act["enabled"]
            for name, value in saved.get("biases", {}).items():  # corrected: as the block settled them
                self.state.bias_values[name] = value.to(self.device)
            if runtime == "onnxruntime":
                module = OrtBlock(block, self.plan.model, self.state, self.target, self.providers, self.device)
            else:
                module = BlockModule(block, self.plan.model, default_opset(self.plan.model), self.state, self.device)
                for layer in block.layers:
                    module.constants.pop(layer.weight, None)
            if store:
                self.store(module, data, index)
        return module

    def _add_quantizers(self, block: Block, method: str) -> None:
        """add_block_quantizers, with the rounders ``ready`` holds for the block when ``method`` is the
        config's (then taken out of it; a fallback to rtn builds its own)."""
        ready = {l.weight: self.ready.pop(l.weight) for l in block.layers if l.weight in self.ready}
        add_block_quantizers(block, self.plan.model, self.state, self.target, self.config, method, self.device,
                             ready if method == self.config.method else None)


class CheckpointedRunner:
    """A BlockRunner behind a checkpoint: a block saved there is resumed instead of learned, and each
    block it learns is saved (its result, exported weights and activation quantizers) once finished."""

    def __init__(self, runner: BlockRunner, checkpoint: Checkpoint) -> None:
        self.runner, self.checkpoint = runner, checkpoint

    def run(self, index: int, block: Block, progress: Progress) -> tuple[BlockModule | OrtBlock, BlockResult]:
        saved = self.checkpoint.load(index, block.name)
        if saved is not None:
            module = self.runner.resume(index, block, saved)
            progress.finish(f"{block.name}: restored from {self.checkpoint.folder}")
            return module, BlockResult(**saved["result"])
        module, result = self.runner.quantize(index, block, progress)
        self.checkpoint.save(index, block.name, result, *finished_state(self.runner.state, block))
        progress.finish(self.runner.summary(index, result))
        return module, result


def finished_state(state: QuantState, block: Block) -> tuple[dict, dict, dict]:
    """A finished block's exported weights, activation quantizers and corrected biases' values, by name:
    what Checkpoint.save keeps of it and BlockRunner.resume rebuilds it from."""
    return ({l.weight: state.rounders[l.weight].export() for l in block.layers},
            {p: state.acts[p] for p in block.all_points if p in state.acts},
            {l.bias: state.bias_values[l.bias] for l in block.layers if l.bias in state.bias_axes})


@torch.no_grad()
def _restore(module: BlockModule, values: list[torch.Tensor]) -> None:
    params = [p for group, _ in module.learnable() for p in group]
    for p, v in zip(params, values, strict=True):
        p.copy_(v)


def head_feeders(plan: BlockPlan) -> set[int]:
    """The indices of the blocks whose outputs a head layer reads (a layer of a block that holds a head
    output, BlockPlan.head_points). Their corrected biases follow the rounding they learn
    (BlockRunner.learn): the head turns any mean its input keeps into a fixed offset of every class
    score, which the feeding block's loss, the squared error of its features, weighs as one part in
    its channels (the PP-OCRv4 recogniser's 1x1 Conv before the CTC head learned a lower loss whose
    mean raised the blank logit by 1.78 against 0.39 for the other classes, round-to-nearest 1.26 and
    0.60: decisions changed vs FP32 566 with round-to-nearest, 768 with that block learned, 606 with
    its bias corrected again; the fast preset's every block, 861 before, 661 with this). Elsewhere
    the start's correction stays and the learned rounding answers the quantized inputs' mean through
    the block loss (corrected again in every block, AdaRound and SignRound on the bundled CNN at W4A8
    fell from 3 dB above round-to-nearest to 24.8 and 22.6 dB against its 24.2)."""
    heads = set(plan.head_points)
    if not heads:
        return set()
    read = {l.input for b in plan.blocks if heads & set(b.act_points) for l in b.layers}
    return {i for i, b in enumerate(plan.blocks) if read & set(b.outputs)}


def make_room_for_biases(block: Block, state: QuantState) -> None:
    """Mutates the block's rounders: a layer whose int32 bias would not fit (bias / (input step × weight
    step) beyond torchify.bias_limit, a channel with tiny weights and so a tiny step) starts from the
    weight step that makes it fit; those channels' small weights lose levels instead of the bias being
    clamped. Run after the activation steps are calibrated; a step learned smaller later still clamps."""
    for layer in block.layers:
        act = state.acts.get(layer.input)
        rounder = state.rounders[layer.weight]
        if layer.bias not in state.int32_biases or act is None or not act.enabled or rounder.group_size:
            continue
        bias = state.float_bias(layer.bias)
        if bias.numel() != rounder.init_scale.numel():
            continue
        # 1 % above the least step that fits, so that float rounding of the product cannot tip it over
        floor = bias.abs() * 1.01 / (act.scale().detach() * state.bias_limits[layer.bias])
        raised = rounder.raise_steps(floor.reshape(rounder.init_scale.shape))
        if raised:
            log.info("%s: raised the weight step of %d channel(s) so that the int32 bias %r fits",
                     layer.node, raised, layer.bias)


def settle_biases(block: Block, state: QuantState) -> None:
    """Mutates ``state``: the block's corrected biases (rounding/bias_correction.py) take the value that
    corrects the rounding the block starts from, once its steps are final (after make_room_for_biases),
    and keep it while the block learns: learning then sees the bias it is given, and a learned rounding
    that moves the output mean is answered by the block loss, not by a bias that moves behind the
    gradient (AdaRound and SignRound on the bundled CNN learned nothing with a bias that followed).
    Once the block has learned, BlockRunner.learn corrects them again for the learned rounding."""
    for layer in block.layers:
        if layer.bias:
            state.settle_bias(layer.bias)


def _warn_not_reached(block: Block, unseen: list[str], untaken: list[str] = ()) -> None:
    """One warning per subgraph whose act points (or, ``untaken``, layers) the calibration data never
    reached."""
    where: dict[tuple[str, str], list[str]] = {}
    for point in block.inner_points:
        if point.tensor in unseen:
            where.setdefault((point.owner, point.graph), [])
    for layer in block.layers:
        if layer.node in untaken:
            where.setdefault((layer.owner, layer.graph), [])
    for layer in block.layers:
        if (layer.owner, layer.graph) in where:
            where[(layer.owner, layer.graph)].append(layer.node)
    for (owner, graph), nodes in where.items():
        log.warning("node %r: %s never ran on the calibration data; its layer(s) %s keep round-to-nearest "
                    "weights and float activations — calibrate with inputs that take it", owner, graph,
                    ", ".join(nodes))


@torch.no_grad()
def simulate(modules: list, plan: BlockPlan, data: CalibrationSet, device: torch.device, batch: int,
             layout: Layout = Layout(), keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The quantized model as onnxflex simulates it: every frozen block in order on ``data``, in the
    model's layout; the graph outputs sample-major (``layout``: their batch axes; a shared output once),
    and the inner tensors named in ``keep`` that a torch block computes (absent where none does)."""
    outputs = [o.name for o in plan.model.graph.output]
    chunks: dict[str, list[np.ndarray]] = {o: [] for o in outputs + [k for k in keep if k not in outputs]}
    per_sample = max([int(np.prod(v.shape[1:], dtype=np.int64)) for v in data.arrays.values()] or [1])
    largest = max([batch * per_sample] + list(_initializer_sizes(plan.model).values()))
    with torch_threads(threads_for(largest, device)):  # the inner activations are not known beforehand
        for feeds in data.batches(batch):
            env = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in feeds.items()}
            for module in modules:
                env.update(module({name: env[name] for name in module.block.inputs}, keep=keep))
            for o, c in chunks.items():
                if o in env:
                    c.append(layout.to_samples(o, env[o]).cpu().numpy())
    return {o: c[0] if layout.shared(o) else np.concatenate(c) for o, c in chunks.items() if c}


def _initializer_sizes(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
