"""Learning steps on a model whose inputs fix the batch at 1: planning sums micro-batches per step
(``RoundingOptions.accumulate``), a step of k micro-batches has the gradient of one batch of those k
samples, and learning that raises the loss on the samples no step drew is undone."""
from __future__ import annotations

import logging
import time
import types

import numpy as np
import onnx
import torch

import onnxflex
from graphs import gemm_mlp, matmul_bias_mlp
from onnxflex.config import QuantConfig
from onnxflex.graph import default_opset
from onnxflex.layout import Layout
from onnxflex.options import resolve
from onnxflex.pipeline import build_plan
from onnxflex.planning import ACCUMULATE_SHARE, plan
from onnxflex.rounding import reconstruct
from onnxflex.rounding.reconstruct import (HELD_MIN, BlockData, BlockRunner, add_block_quantizers, rows,
                                           step_backward, step_groups, unseen_rows)
from onnxflex.rounding.torchify import BlockModule, QuantState
from onnxflex.runtimes.targets import get_target

CPU = torch.device("cpu")


def test_a_fixed_batch_1_model_accumulates_a_quarter_of_the_batch_and_a_free_batch_model_does_not(monkeypatch):
    given = resolve(QuantConfig(method="flexround", preset="fast"))
    fixed = plan(matmul_bias_mlp(), given).config.rounding
    assert (fixed.batch_size, fixed.accumulate) == (1, round(ACCUMULATE_SHARE * given.rounding.batch_size)) == (1, 8)
    free = plan(gemm_mlp(), given).config.rounding
    assert (free.batch_size, free.accumulate) == (given.rounding.batch_size, 1), free
    x = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32)
    sizes = []

    def counted(module, data, idx, accumulate, extra=0.0):
        sizes.append((len(idx), accumulate))
        return step_backward(module, data, idx, accumulate, extra)

    monkeypatch.setattr(reconstruct, "step_backward", counted)
    result = onnxflex.quantize(matmul_bias_mlp(), {"x": x}, QuantConfig(method="flexround", iters=3,
                                                                        early_stop=0), progress=False)
    rec = result.report["reconstruction"]
    assert (rec["batch_size"], rec["accumulate"]) == (1, 8), rec
    blocks = sum(b["iters"] > 0 for b in result.report["blocks"])
    assert blocks and sizes == [(1, 8)] * (3 * 8 * blocks), f"micro-batches (size, accumulate) run: {sizes}"


class _Data:
    """The parts of BlockData a step and an evaluation read, on in-memory tensors."""

    def __init__(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
        self.q_inputs, self.fp_outputs = inputs, targets
        self.num_samples = next(iter(inputs.values())).shape[0]
        self.device = CPU
        self._buffers = {}

    step_rows = BlockData.step_rows

    def run(self, module, inputs, observe=None):
        return module(inputs)

    def nograd_batch(self, size: int) -> int:
        return size


def _block(model: onnx.ModelProto, method: str = "flexround"):
    """(the first block of ``model`` as a BlockModule with calibrated act steps, its _Data of 64 samples
    whose targets are the FP block's outputs, the run's RoundingOptions)."""
    config = resolve(QuantConfig(method=method, preset="fast"))
    built = build_plan(model, config.plan)
    block = built.blocks[0]
    state = QuantState()
    add_block_quantizers(block, built.model, state, get_target("onnxruntime"), config.rounding, method, CPU)
    module = BlockModule(block, built.model, default_opset(built.model), state, CPU)
    gen = torch.Generator().manual_seed(3)
    inputs = {name: torch.randn(64, 32, generator=gen) for name in block.inputs}
    with torch.no_grad():
        module.quantize = False
        targets = {k: v.detach() for k, v in module(inputs).items()}
        module.quantize = True
    for act in state.acts.values():
        act.calibrate(-3.0, 3.0, None, "minmax")
    return module, _Data(inputs, targets), config.rounding


def _grads(module: BlockModule) -> list[torch.Tensor]:
    return [p.grad.clone() for params, _ in module.learnable() for p in params]


def test_a_step_of_k_micro_batches_has_the_gradient_of_one_batch_of_the_k_samples():
    module, data, _ = _block(gemm_mlp())
    module.train()
    picked = torch.tensor([5, 17, 17, 40])
    for p in module.parameters():
        p.grad = None
    losses = [step_backward(module, data, picked[i:i + 1], len(picked)) for i in range(len(picked))]
    accumulated = _grads(module)
    for p in module.parameters():
        p.grad = None
    whole = step_backward(module, data, picked, 1)
    batched = _grads(module)
    assert abs(sum(losses) / len(losses) - whole) <= 1e-6 * abs(whole), (losses, whole)
    assert any(float(g.abs().max()) > 0 for g in batched), "the block must have gradients to compare"
    worst = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(accumulated, batched))
    assert worst <= 1e-5, f"accumulated gradient differs from the batch's by {worst:.3g} (relative)"


def test_micro_batches_sharing_one_fake_quant_have_the_gradient_of_one_fake_quant_each():
    """BlockModule.step_weights: the micro-batches of a step round each weight once, and their summed
    gradient reaches the rounders' parameters as when every micro-batch rounds on its own."""
    module, data, _ = _block(gemm_mlp())
    module.train()
    picked = torch.tensor([3, 9, 9, 61])
    rounder_calls = []
    originals = {id(r): r.fake_quant for r in module.own_rounders}
    for r in module.own_rounders:
        r.fake_quant = (lambda f: lambda: rounder_calls.append(1) or f())(originals[id(r)])
    for p in module.parameters():
        p.grad = None
    alone = [step_backward(module, data, picked[i:i + 1], len(picked)) for i in range(len(picked))]
    separate, each = _grads(module), len(rounder_calls)
    for p in module.parameters():
        p.grad = None
    rounder_calls.clear()
    with module.step_weights():
        shared = [step_backward(module, data, picked[i:i + 1], len(picked)) for i in range(len(picked))]
    together = _grads(module)
    layers = len(module.own_rounders)
    assert (each, len(rounder_calls)) == (len(picked) * layers, layers), (each, len(rounder_calls))
    assert shared == alone, (shared, alone)
    assert any(float(g.abs().max()) > 0 for g in together), "the block must have gradients to compare"
    worst = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(together, separate))
    # the same sum in another float32 order (the micro-batches' weight gradients first)
    assert worst <= 1e-4, f"shared fake_quant's gradient differs by {worst:.3g} (relative)"


def test_step_rows_gather_the_rows_into_one_buffer_per_tensor():
    module, data, _ = _block(gemm_mlp())
    first = data.step_rows("q", data.q_inputs, torch.tensor([1, 2, 3]))
    kept = {k: v.clone() for k, v in first.items()}
    second = data.step_rows("q", data.q_inputs, torch.tensor([7, 0, 63]))
    for name, value in data.q_inputs.items():
        assert torch.equal(kept[name], rows(value, torch.tensor([1, 2, 3])))
        assert torch.equal(second[name], rows(value, torch.tensor([7, 0, 63])))
        assert second[name].data_ptr() == first[name].data_ptr(), "the second batch must reuse the first's buffer"
    other = data.step_rows("q", data.q_inputs, torch.tensor([4, 5]))  # another batch size: a new buffer
    assert all(torch.equal(other[k], rows(v, torch.tensor([4, 5]))) for k, v in data.q_inputs.items())


def test_step_groups_with_one_micro_batch_draw_the_steps_indices():
    grouped = [g for group in step_groups(4, 50, 3, 70, 1, CPU) for g in group]
    twice = [g for group in step_groups(4, 50, 3, 35, 2, CPU) for g in group]
    assert len(grouped) == 70 and all(len(g) == 1 for g in step_groups(4, 50, 3, 70, 1, CPU))
    assert all(torch.equal(a, b) for a, b in zip(grouped, twice)), "k micro-batches are the stream's next k draws"


def test_unseen_rows_are_the_samples_no_step_drew_and_stop_early_on_a_million_steps():
    config = resolve(QuantConfig(iters=10)).rounding.replace(accumulate=3)
    held = unseen_rows(0, 100, 1, config, 10)
    drawn = {int(i) for group in step_groups(0, 100, 1, 10, 3, CPU) for idx in group for i in idx}
    assert held is not None and set(held.tolist()) == set(range(100)) - drawn and len(held) == 100 - len(drawn)
    assert unseen_rows(0, 100, 1, config, 2) is not None and len(unseen_rows(0, 100, 1, config, 2)) > len(held)
    many = config.replace(iters=1_000_000, accumulate=8)
    started = time.process_time()
    assert unseen_rows(0, 64, 1, many, 1_000_000) is None
    seconds = time.process_time() - started
    assert seconds < 2.0, f"unseen_rows took {seconds:.2f} s CPU on 1,000,000 steps: it must stop once covered"
    assert unseen_rows(0, HELD_MIN + 2, 1, config.replace(iters=1), 1) is None, "fewer than HELD_MIN undrawn: None"


def _runner(config) -> BlockRunner:
    cache = types.SimpleNamespace(num_samples=64, layout=Layout())  # what BlockRunner reads of it here
    return BlockRunner(build_plan(gemm_mlp(), resolve(QuantConfig()).plan), cache, QuantState(),
                       get_target("onnxruntime"), config, CPU, ("CPUExecutionProvider",))


def _learn_with(monkeypatch, caplog, worse_on_held: bool):
    """Run BlockRunner.learn with a 'training' that scales every learnable parameter by 3 on one block
    (worse everywhere) when ``worse_on_held``, else changes nothing, and an all-sample evaluation that
    reports a drop, so that only the held-out check can undo it. Returns (module, its start values)."""
    module, data, config = _block(gemm_mlp())
    config = config.replace(iters=2, batch_size=1, accumulate=2)  # 4 draws of 64 samples: most undrawn
    start = [p.detach().clone() for params, _ in module.learnable() for p in params]

    def fake_train(module, data, config, seed, progress):
        with torch.no_grad():
            for params, _ in module.learnable():
                for p in params:
                    p.mul_(3.0 if worse_on_held else 1.0)
        return config.iters

    losses = iter([1.0, 0.5])
    monkeypatch.setattr(reconstruct, "train", fake_train)
    monkeypatch.setattr(reconstruct, "evaluate", lambda module, data, batch: next(losses))
    with caplog.at_level(logging.WARNING, logger="onnxflex"):
        _runner(config).learn(module, data, seed=0, progress=None, iters=config.iters)
    return module, start


def test_learning_that_raises_the_held_out_loss_is_undone(monkeypatch, caplog):
    module, start = _learn_with(monkeypatch, caplog, worse_on_held=True)
    now = [p.detach() for params, _ in module.learnable() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(now, start)), "the start parameters must be restored"
    assert any("samples no step drew" in r.message and module.block.name in r.message for r in caplog.records), \
        [r.message for r in caplog.records]


def test_learning_that_keeps_the_held_out_loss_stays(monkeypatch, caplog):
    module, _ = _learn_with(monkeypatch, caplog, worse_on_held=False)
    assert not any("samples no step drew" in r.message for r in caplog.records), [r.message for r in caplog.records]
