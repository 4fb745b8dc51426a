"""Block reconstruction: per block, in order, learn rounding and activation steps so that the
quantized block on quantized inputs matches the FP block on FP inputs; then run the frozen block
to produce the next blocks' quantized inputs.

    minimise  Σ_outputs || block_q(x_q) − block_fp(x_fp) ||²   over rounder and step-size parameters
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnxflex.blocks import Block, BlockPlan
from onnxflex.capture import TensorCache
from onnxflex.config import QuantConfig
from onnxflex.graph import default_opset
from onnxflex.progress import Progress
from onnxflex.rounding.activation import ActQuantizer, sample_values
from onnxflex.rounding.ortblock import OrtBlock
from onnxflex.rounding.rounders import make_rounder
from onnxflex.rounding.torchify import BlockModule, QuantState
from onnxflex.runtimes.base import Target

log = logging.getLogger("onnxflex")


@dataclass(frozen=True)
class BlockResult:
    name: str
    loss_before: float
    loss_after: float
    iters: int
    seconds: float
    runtime: str = "torch"


class BlockData:
    """A block's tensors on the compute device: FP inputs, FP targets and quantized-path inputs."""

    def __init__(self, block: Block, cache: TensorCache, device: torch.device) -> None:
        def load(key):
            return torch.from_numpy(np.array(cache[key])).to(device)

        self.fp_inputs = {n: load("fp:" + n) for n in block.inputs}
        self.fp_outputs = {n: load("fp:" + n) for n in block.outputs}
        self.q_inputs = {n: load("q:" + n) if "q:" + n in cache else self.fp_inputs[n] for n in block.inputs}
        self.num_samples = next(iter(self.fp_outputs.values())).shape[0]


def add_block_quantizers(block: Block, model: onnx.ModelProto, state: QuantState, target: Target,
                         config: QuantConfig, method: str, device: torch.device) -> None:
    """Mutates ``state``: a rounder per layer weight, an activation quantizer per act point."""
    inits = {t.name: t for t in model.graph.initializer}
    for layer in block.layers:
        w = torch.from_numpy(numpy_helper.to_array(inits[layer.weight]).astype(np.float32)).to(device)
        state.rounders[layer.weight] = make_rounder(method, w, layer.axis, config.wbits, config.weight_scale)
        if layer.bias and target.int32_bias and config.abits:
            state.int32_biases[layer.bias] = (layer.weight, layer.input)
            b = numpy_helper.to_array(inits[layer.bias]).astype(np.float32)
            state.bias_values[layer.bias] = torch.from_numpy(b).to(device)
    for point in block.act_points:
        state.acts[point] = ActQuantizer(config.abits, target.act_symmetric).to(device)


@torch.no_grad()
def calibrate_activations(module, data: BlockData, config: QuantConfig, seed: int) -> None:
    """Initialise each act point's step from the FP block run on FP inputs."""
    points = [p for p in module.block.act_points if p in module.state.acts]
    if not points:
        return
    ranges: dict[str, list[float]] = {}
    samples: dict[str, list[torch.Tensor]] = {p: [] for p in points}

    def observe(name, value):
        if name in samples:
            lo, hi = float(value.min()), float(value.max())
            old = ranges.get(name, [lo, hi])
            ranges[name] = [min(old[0], lo), max(old[1], hi)]
            samples[name].append(value.detach().reshape(-1).cpu())

    module.quantize = False
    for batch in _batches(data.fp_inputs, data.num_samples, config.batch_size):
        module(batch, observe=observe)
    module.quantize = True
    gen = torch.Generator().manual_seed(seed)
    for name in points:
        sample = sample_values(torch.cat(samples[name]), gen)
        module.state.acts[name].calibrate(*ranges[name], sample, config.act_scale)


def _batches(tensors: dict[str, torch.Tensor], n: int, size: int):
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in tensors.items()}


def block_loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = [torch.mean((out[k] - target[k]) ** 2) for k in target if target[k].is_floating_point()]
    return torch.stack(losses).sum()


@torch.no_grad()
def evaluate(module, data: BlockData, batch: int) -> float:
    total = 0.0
    for start in range(0, data.num_samples, batch):
        inputs = {k: v[start:start + batch] for k, v in data.q_inputs.items()}
        target = {k: v[start:start + batch] for k, v in data.fp_outputs.items()}
        total += float(block_loss(module(inputs), target)) * len(next(iter(target.values())))
    return total / data.num_samples


def train(module: BlockModule, data: BlockData, config: QuantConfig, seed: int, progress: Progress) -> None:
    """Adam with a cosine-decayed learning rate over random minibatches of the block's samples."""
    lrs = {"lr": config.lr, "scale_lr": config.scale_lr, "act_lr": config.act_lr}
    groups = [{"params": params, "lr": lrs[kind]} for params, kind in module.learnable() if params]
    if not groups or config.iters == 0:
        return
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.iters, eta_min=0.0)
    gen = torch.Generator().manual_seed(seed)
    batch = min(config.batch_size, data.num_samples)
    for it in range(config.iters):
        idx = torch.randint(0, data.num_samples, (batch,), generator=gen).to(
            next(iter(data.q_inputs.values())).device)
        out = module({k: v[idx] for k, v in data.q_inputs.items()})
        loss = block_loss(out, {k: v[idx] for k, v in data.fp_outputs.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.update(it + 1, f"loss {loss.item():.3g}")


@torch.no_grad()
def store_quantized_outputs(module, data: BlockData, cache: TensorCache, batch: int) -> None:
    """Run the frozen block on the quantized path and keep its outputs (and quantized graph inputs)."""
    outs: dict[str, list[np.ndarray]] = {n: [] for n in module.block.outputs}
    for start in range(0, data.num_samples, batch):
        result = module({k: v[start:start + batch] for k, v in data.q_inputs.items()})
        for name, value in result.items():
            outs[name].append(value.cpu().numpy())
    for name, chunks in outs.items():
        cache.put("q:" + name, np.concatenate(chunks))
    for name in module.input_points:
        cache.put("q:" + name, module.state.acts[name](data.q_inputs[name]).cpu().numpy())


def reconstruct(plan: BlockPlan, cache: TensorCache, state: QuantState, target: Target, config: QuantConfig,
                device: torch.device, progress: Progress, providers: tuple[str, ...] = ("CPUExecutionProvider",)
                ) -> tuple[list[BlockResult], list]:
    """The block loop. Mutates ``state`` (adds and trains quantizers) and ``cache`` (adds q: tensors);
    returns each block's result and its frozen module (a BlockModule, or an OrtBlock for blocks with
    ops the torch side cannot express)."""
    results, modules = [], []
    for k, block in enumerate(plan.blocks):
        t0 = time.perf_counter()
        data = BlockData(block, cache, device)
        seed = config.seed * 1000 + k
        module = _block_runner(block, plan, state, target, config, data, seed, device, providers)
        learns = isinstance(module, BlockModule) and config.method != "rtn"
        before = evaluate(module, data, config.batch_size)
        progress.start(config.iters if learns else 0, f"{block.name} ({k + 1}/{len(plan.blocks)})")
        if learns:
            start = [p.detach().clone() for params, _ in module.learnable() for p in params]
            train(module, data, config, seed, progress)
        after = evaluate(module, data, config.batch_size)
        if learns and after > before:
            _restore(module, start)
            log.info("%s: learning ended at a higher loss (%.4g > %.4g); kept the round-to-nearest start",
                     block.name, after, before)
            after = evaluate(module, data, config.batch_size)
        store_quantized_outputs(module, data, cache, config.batch_size)
        runtime = "torch" if isinstance(module, BlockModule) else "onnxruntime"
        results.append(BlockResult(block.name, before, after, config.iters if learns else 0,
                                   time.perf_counter() - t0, runtime))
        progress.finish(f"{block.name}: loss {before:.4g} -> {after:.4g}")
        modules.append(module)
    return results, modules


@torch.no_grad()
def _restore(module: BlockModule, values: list[torch.Tensor]) -> None:
    params = [p for group, _ in module.learnable() for p in group]
    for p, v in zip(params, values, strict=True):
        p.copy_(v)


def _block_runner(block, plan, state, target, config, data, seed, device, providers):
    """A calibrated BlockModule, or an OrtBlock with RTN weights when a node has no torch converter
    (or its converter rejects an attribute)."""
    problem = f"no torch converter for {', '.join(block.unsupported)}" if block.unsupported else ""
    if not problem:
        add_block_quantizers(block, plan.model, state, target, config, config.method, device)
        module = BlockModule(block, plan.model, default_opset(plan.model), state, device)
        try:
            calibrate_activations(module, data, config, seed)
            return module
        except NotImplementedError as exc:
            problem = str(exc)
    log.warning("%s: %s; its weights fall back to round-to-nearest and the block runs in onnxruntime — "
                "exclude its nodes with --exclude-node to keep them in float instead", block.name, problem)
    add_block_quantizers(block, plan.model, state, target, config, "rtn", device)
    module = OrtBlock(block, plan.model, state, target, providers, device)
    calibrate_activations(module, data, config, seed)
    return module


@torch.no_grad()
def simulate(modules: list, plan: BlockPlan, feeds: dict[str, np.ndarray], device: torch.device,
             batch: int) -> dict[str, np.ndarray]:
    """The quantized model as onnxflex simulates it: every frozen block in order on ``feeds``."""
    n = len(next(iter(feeds.values())))
    outputs = [o.name for o in plan.model.graph.output]
    chunks: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    for start in range(0, n, batch):
        env = {k: torch.from_numpy(np.asarray(v[start:start + batch])).to(device) for k, v in feeds.items()}
        for module in modules:
            env.update(module({name: env[name] for name in module.block.inputs}))
        for o in outputs:
            chunks[o].append(env[o].cpu().numpy())
    return {o: np.concatenate(c) for o, c in chunks.items()}
