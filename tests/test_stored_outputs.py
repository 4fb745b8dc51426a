"""The quantized outputs a block stores for the next ones: a torch block that learns nothing, ahead of the
last block that learns, runs its emitted subgraph in onnxruntime (BlockRunner.store)."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

import onnxflex
from graphs import conv_batchnorm
from onnxflex.cache import Key
from onnxflex.config import QuantConfig
from onnxflex.rounding import reconstruct


def stored_against_torch(monkeypatch, model, data, zero: int) -> tuple[list[str], list, dict]:
    """Quantize ``model`` on ``data`` (flexround, 2 steps) with blocks 0..``zero`` given no steps and the
    others their iterations: (the blocks that ran in an OrtBlock, (module kind, stored rows, the torch
    block's rows, act step) for each output of blocks 0..``zero``, the report)."""
    compared = []
    store = reconstruct.BlockRunner.store

    def checked(self, module, data, index):
        loss = store(self, module, data, index)
        if index <= zero:
            with torch.no_grad(), reconstruct.fixed_weights(module):
                torch_out = data.run(module, {k: v[:data.num_samples] for k, v in data.q_inputs.items()})
            for name, value in torch_out.items():
                stored = np.asarray(self.cache[Key.q(name)])
                step = self.state.acts[name].export()[0] if name in self.state.acts else 1e-3
                compared.append((type(module).__name__, stored, value.numpy(), step))
        return loss

    monkeypatch.setattr(reconstruct.BlockRunner, "store", checked)
    monkeypatch.setattr(reconstruct, "block_steps",
                        lambda config, budget, index: 0 if index <= zero else config.iters)
    ran = []
    call = reconstruct.OrtBlock.__call__

    def recorded(self, feeds, *args, **kwargs):
        ran.append(self.block.name)
        return call(self, feeds, *args, **kwargs)

    monkeypatch.setattr(reconstruct.OrtBlock, "__call__", recorded)
    config = QuantConfig(method="flexround", iters=2, early_stop=0, calib_samples=0, verify_samples=8)
    report = onnxflex.quantize(model, data, config, progress=False).report
    assert [b["iters"] for b in report["blocks"]][zero:zero + 2] == [0, 2], report["blocks"]
    return ran, compared, report


def assert_within_a_step(compared: list) -> None:
    assert compared, "no stored outputs were compared"
    for kind, stored, computed, step in compared:
        assert kind == "BlockModule" and stored.shape == computed.shape, (kind, stored.shape, computed.shape)
        assert np.abs(stored - computed).max() <= step * 1.01, (np.abs(stored - computed).max(), step)
        assert np.mean(np.isclose(stored, computed, atol=step * 1e-3)) >= 0.99


def test_a_block_that_learns_nothing_before_a_learner_stores_through_onnxruntime(monkeypatch):
    """Its quantized outputs, the next block's inputs, come from its emitted subgraph in onnxruntime (an
    OrtBlock on the frozen state), and agree with the torch block's fake-quantized outputs to within one
    activation step, nearly all of them exactly."""
    x = np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32)
    ran, compared, _ = stored_against_torch(monkeypatch, conv_batchnorm(), {"x": x}, zero=0)
    assert ran and set(ran) == {"block0"}, ran
    assert_within_a_step(compared)


def if_then_conv() -> onnx.ModelProto:
    """test_capture_ranges.front_then_if (conv0 → conv1 → If(sr == 16000), weights inside the branches)
    followed by relu → conv2: the If's block sits between two others."""
    from test_capture_ranges import front_then_if

    model = front_then_if()
    graph = model.graph
    branch_out = graph.output[0].name
    for node in graph.node:
        node.output[:] = ["g" if o == branch_out else o for o in node.output]
    w = np.random.default_rng(4).standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.1
    graph.initializer.append(numpy_helper.from_array(w, "w2"))
    graph.node.extend([helper.make_node("Relu", ["g"], ["r2"], name="relu2"),
                       helper.make_node("Conv", ["r2", "w2"], [branch_out], name="conv2", pads=[1, 1, 1, 1])])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_block_holding_an_if_stores_through_onnxruntime_too(monkeypatch):
    """conv0 → conv1 → If (its branches' weights inside them) → conv2, the blocks up to the If's given no
    steps: the If's block stores through its emitted subgraph as well (the passes made the branches'
    outer-scope reads explicit inputs), within one activation step of its torch module."""
    model = if_then_conv()
    plan = onnxflex.pipeline.build_plan(model, onnxflex.options.resolve(QuantConfig()).plan)
    ops = {n.name: n.op_type for n in plan.model.graph.node}
    holding = [i for i, b in enumerate(plan.blocks) if any(ops[n] == "If" for n in b.nodes)]
    assert holding and holding[-1] < len(plan.blocks) - 1, [b.nodes for b in plan.blocks]
    data = {"x": np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32),
            "sr": np.array(16000, np.int64)}
    ran, compared, report = stored_against_torch(monkeypatch, model, data, zero=holding[-1])
    assert plan.blocks[holding[-1]].name in ran, ran
    assert_within_a_step(compared)
