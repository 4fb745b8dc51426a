"""A block run without gradients holds a few of its tensors at a time: each leaves the interpreter's
environment after its last reader (a real detector head of 51 layers at 736x736 held every inner
tensor of a 32-sample batch at once, 15 GB)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxflex.rounding.converters.registry import OpNode
from onnxflex.rounding.torchify import Branch, release_schedule


def chain_model(length: int = 30, channels: int = 4) -> onnx.ModelProto:
    """A 1x1 conv followed by ``length`` element-wise nodes: one block whose inner tensors are all the
    size of its input."""
    w = np.random.default_rng(0).standard_normal((channels, channels, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], name="conv")]
    for i in range(length):
        nodes.append(helper.make_node("Neg" if i % 2 else "Relu", [f"t{i}"], [f"t{i + 1}"], name=f"op{i}"))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info(f"t{length}", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _step(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]):
    return (OpNode("Relu", name, inputs, outputs, 17, {}, ""), None, None)


def test_each_tensor_is_released_after_its_last_reader_and_outputs_stay():
    steps = [_step("a", ("x",), ("t1",)), _step("b", ("t1",), ("t2",)), _step("c", ("t1", "t2"), ("t3",)),
             _step("d", ("t3",), ("y",))]
    schedule = release_schedule(steps, {}, keep=("y", "t2"))
    assert [sorted(names) for names in schedule] == [["x"], [], ["t1"], ["t3"]]


def test_a_subgraph_keeps_the_outer_tensors_it_names_alive_until_it_runs():
    inner = [_step("in", ("outer",), ("r",))]
    steps = [_step("a", ("x",), ("outer",)), _step("b", ("x",), ("cond",)), _step("if", ("cond",), ("y",))]
    branches = {"if": {"then_branch": Branch(inner, ("r",), {}), "else_branch": Branch([], ("outer",), {})}}
    schedule = release_schedule(steps, branches, keep=("y",))
    assert sorted(schedule[2]) == ["cond", "outer", "r"] and schedule[0] == [] and schedule[1] == ["x"]


def test_a_long_block_without_gradients_peaks_at_a_few_tensors():
    """Peak RSS of the float forward of a 30-node chain on a 32 MB input, released as scheduled, then
    with every tensor held: the first adds at most a few tensors' worth, the second about all of them
    (so the test fails if release stops working)."""
    script = textwrap.dedent("""
        import resource, sys, torch
        sys.path.insert(0, sys.argv[1])
        from test_block_memory import chain_model
        import onnxflex
        from onnxflex.graph import default_opset
        from onnxflex.options import resolve
        from onnxflex.planning import build_plan
        from onnxflex.rounding.reconstruct import add_block_quantizers
        from onnxflex.rounding.torchify import BlockModule, QuantState
        from onnxflex.runtimes.targets import get_target

        config = resolve(onnxflex.QuantConfig())
        plan = build_plan(chain_model(), config.plan)
        (block,) = plan.blocks
        state, cpu = QuantState(), torch.device("cpu")
        add_block_quantizers(block, plan.model, state, get_target("onnxruntime"), config.rounding, "rtn", cpu)
        module = BlockModule(block, plan.model, default_opset(plan.model), state, cpu)
        module.quantize = False
        x = torch.randn(8, 4, 512, 512)
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with torch.no_grad():
            module({"x": torch.randn(1, 4, 8, 8)})  # one-time kernel set-up is not what is measured
            base = peak()
            released = module({"x": x})
            first = peak()
            del released
            module.released = (None, None)
            held = module({"x": x})
            second = peak()
        print(first - base, second - base)
    """)
    run = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    released_mb, held_mb = map(float, run.stdout.split()[-2:])
    assert released_mb < 200, (released_mb, held_mb)  # tensors of 32 MB: a few at a time
    assert held_mb > 700, (released_mb, held_mb)  # all 31 of them


def test_capture_runs_fewer_samples_at_once_when_their_outputs_would_pass_a_quarter_of_the_cache():
    from onnxflex.capture import CAPTURE_BATCH, capture_batch

    assert capture_batch(0, 1 << 30) == CAPTURE_BATCH  # sizes unknown: the default
    assert capture_batch(1 << 20, 1 << 30) == CAPTURE_BATCH
    assert capture_batch(184 << 20, 2048 << 20) == 2  # a 736x736 detector's boundaries
    assert capture_batch(1 << 30, 1 << 20) == 1


def test_the_pipeline_sizes_its_capture_runs_from_the_plan(monkeypatch):
    """With a 1 MiB cache the bundled CNN's boundaries over 64 samples pass its quarter: capture runs in
    smaller batches (test_external_data checks that the model is byte for byte the same)."""
    import onnxflex
    import onnxflex.stages as stages
    from helpers import CNN

    batches = []
    real = stages.capture

    def spy(*args, batch, **kwargs):
        batches.append(batch)
        return real(*args, batch=batch, **kwargs)

    monkeypatch.setattr(stages, "capture", spy)
    for mb in (2048, 1):
        onnxflex.quantize(CNN, None, onnxflex.QuantConfig(method="rtn", calib_samples=64, verify_samples=0,
                                                          max_cache_mb=mb), progress=False)
    assert batches[0] == 64 and 1 <= batches[1] < 64, batches


def test_runs_without_gradients_take_fewer_samples_when_a_batch_would_pass_a_quarter_of_the_cache():
    import torch

    from onnxflex.rounding.reconstruct import INNER_TENSORS, BlockData, Shared

    data = BlockData.__new__(BlockData)  # the sizes only: no cache or block needed
    data.fp_inputs = {"x": torch.zeros(64, 1000), "bias": Shared(torch.zeros(10 ** 6))}
    data.fp_outputs = {"y": torch.zeros(64, 3000)}
    per_sample = 4 * (4000 + INNER_TENSORS * 3000)
    data.max_bytes = 1 << 30
    assert data.nograd_batch(32) == 32
    data.max_bytes = 4 * per_sample * 5 + 3
    assert data.nograd_batch(32) == 5
    data.max_bytes = 1
    assert data.nograd_batch(32) == 1
