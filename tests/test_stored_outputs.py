"""The quantized outputs a block stores for the next ones: a torch block that learns nothing, ahead of the
last block that learns, runs its emitted subgraph in onnxruntime (BlockRunner.store)."""
from __future__ import annotations

import numpy as np
import torch

import onnxflex
from graphs import conv_batchnorm
from onnxflex.cache import Key
from onnxflex.config import QuantConfig
from onnxflex.rounding import reconstruct


def test_a_block_that_learns_nothing_before_a_learner_stores_through_onnxruntime(monkeypatch):
    """Its quantized outputs, the next block's inputs, come from its emitted subgraph in onnxruntime (an
    OrtBlock on the frozen state), and agree with the torch block's fake-quantized outputs to within one
    activation step, nearly all of them exactly."""
    compared = []
    store = reconstruct.BlockRunner.store

    def checked(self, module, data, index):
        loss = store(self, module, data, index)
        if index == 0:
            with torch.no_grad(), reconstruct.fixed_weights(module):
                torch_out = data.run(module, dict(data.q_inputs))
            for name, value in torch_out.items():
                stored = np.asarray(self.cache[Key.q(name)])
                step = self.state.acts[name].export()[0] if name in self.state.acts else 1e-3
                compared.append((type(module).__name__, stored, value.numpy(), step))
        return loss

    monkeypatch.setattr(reconstruct.BlockRunner, "store", checked)
    monkeypatch.setattr(reconstruct, "block_steps", lambda config, budget, index: 0 if index == 0 else config.iters)
    ran = []
    monkeypatch.setattr(reconstruct.OrtBlock, "__call__", _recording(reconstruct.OrtBlock.__call__, ran))
    x = np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32)
    config = QuantConfig(method="flexround", iters=2, early_stop=0, calib_samples=0, verify_samples=8)
    result = onnxflex.quantize(conv_batchnorm(), {"x": x}, config, progress=False)
    assert [b["iters"] for b in result.report["blocks"]][:2] == [0, 2], result.report["blocks"]
    assert ran and set(ran) == {"block0"}, ran
    assert compared, "block 0's quantized outputs were not compared"
    for kind, stored, computed, step in compared:
        assert kind == "BlockModule" and stored.shape == computed.shape, (kind, stored.shape, computed.shape)
        assert np.abs(stored - computed).max() <= step * 1.01, (np.abs(stored - computed).max(), step)
        assert np.mean(np.isclose(stored, computed, atol=step * 1e-3)) >= 0.99


def _recording(call, ran: list[str]):
    def recorded(self, feeds, *args, **kwargs):
        ran.append(self.block.name)
        return call(self, feeds, *args, **kwargs)
    return recorded
