"""On a model that fixes its batch at 1, the blocks that compute each sample apart (onnxflex/persample.py)
take a step's micro-batches as one batch: the same samples, loss and gradient in fewer, larger runs;
a block whose nodes tie a sample to the batch (Reshape, a slice or concatenation along it, a constant
that broadcasts over it) keeps micro-batches of one sample."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from graphs import conv_batchnorm, conv_mul_add_bn, fixed_batch_reshape, hardswish_se
from onnxflex.config import QuantConfig
from onnxflex.layout import Layout
from onnxflex.options import resolve
from onnxflex.persample import apart_blocks
from onnxflex.planning import plan
from onnxflex.rounding import reconstruct
from onnxflex.rounding.reconstruct import step_backward


def _fixed(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its batch fixed at 1 in every graph input and output."""
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    return model


def _planned(model: onnx.ModelProto):
    return plan(model, resolve(QuantConfig(method="flexround", preset="fast"))).plan


@pytest.mark.parametrize("build", [conv_batchnorm, conv_mul_add_bn, hardswish_se])
def test_conv_blocks_of_a_fixed_batch_model_keep_samples_apart(build):
    planned = _planned(_fixed(build()))
    assert apart_blocks(planned, Layout()) == {b.name for b in planned.blocks}, build.__name__


def test_a_block_with_a_reshape_to_the_fixed_batch_does_not():
    planned = _planned(fixed_batch_reshape())
    ops = {n.name: n.op_type for n in planned.model.graph.node}
    reshaping = {b.name for b in planned.blocks if "Reshape" in {ops[n] for n in b.nodes}}
    assert reshaping and not reshaping & apart_blocks(planned, Layout())


def _conv_then(op: str, extra: list[onnx.TensorProto | None], out_shape: list[int], second: bool = False, **attrs):
    """x [1,4,8,8] → Conv (4→4, 3x3, same) → ``op`` (its inputs: the conv output, then the conv output
    again when ``second``, then ``extra`` initializers, None an omitted input) → y of ``out_shape``; batch
    fixed at 1."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.2, "w")
    inputs = ["c"] + (["c"] if second else []) + [t.name if t is not None else "" for t in extra]
    extra = [t for t in extra if t is not None]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node(op, inputs, ["y"], name="op", **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], [w, *extra])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _floats(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full(shape, 0.5, np.float32), name)


@pytest.mark.parametrize("model, apart", [
    (_conv_then("Slice", [_ints("s", [1]), _ints("e", [7]), _ints("a", [2])], [1, 4, 6, 8]), True),
    (_conv_then("Slice", [_ints("s", [0]), _ints("e", [1]), _ints("a", [0])], [1, 4, 8, 8]), False),
    (_conv_then("Slice", [_ints("s", [1]), _ints("e", [7]), _ints("a", [-1])], [1, 4, 8, 6]), True),
    (_conv_then("Concat", [], [1, 8, 8, 8], second=True, axis=1), True),
    (_conv_then("Concat", [], [2, 4, 8, 8], second=True, axis=0), False),
    (_conv_then("Resize", [None, numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "k")],
                [1, 4, 16, 16]), True),
    (_conv_then("Resize", [None, None, _ints("k", [1, 4, 16, 16])], [1, 4, 16, 16]), False),  # sizes: batch 1
    (_conv_then("Softmax", [], [1, 4, 8, 8]), True),
    (_conv_then("Softmax", [], [1, 4, 8, 8], axis=0), False),
    (_conv_then("Mul", [_floats("k", (1, 4, 1, 1))], [1, 4, 8, 8]), True),
    (_conv_then("Mul", [_floats("k", (4, 1, 1))], [1, 4, 8, 8]), True),
    (_conv_then("Mul", [_floats("k", (2, 4, 8, 8))], [2, 4, 8, 8]), False),  # the constant sets the batch
    (_conv_then("Mul", [_floats("k", (3, 1, 4, 1, 1))], [3, 1, 4, 8, 8]), False),  # it moves the samples
], ids=["slice-h", "slice-batch", "slice-last", "concat-c", "concat-batch", "resize-scales", "resize-sizes",
        "softmax", "softmax-batch", "mul-1c11", "mul-c11", "mul-batch", "mul-rank5"])
def test_which_nodes_keep_samples_apart(model, apart):
    planned = _planned(model)
    found = apart_blocks(planned, Layout())
    assert (found == {b.name for b in planned.blocks}) if apart else not found, (found, planned.blocks)


def test_a_block_whose_samples_are_off_axis_0_in_the_cache_does_not():
    planned = _planned(_fixed(conv_batchnorm()))
    reading = {b.name for b in planned.blocks if "x" in b.inputs}
    every = apart_blocks(planned, Layout())
    assert reading and reading < every and apart_blocks(planned, Layout({"x": 1})) == every - reading


def _quantize(monkeypatch, apart: bool):
    """conv_batchnorm with its batch fixed at 1, flexround for 3 steps, and the (size, accumulate) of
    every micro-batch its steps ran; ``apart`` False: no block is taken for one that keeps samples apart."""
    sizes = []

    def counted(module, data, idx, accumulate, extra=0.0):
        sizes.append((len(idx), accumulate))
        return step_backward(module, data, idx, accumulate, extra)

    monkeypatch.setattr(reconstruct, "step_backward", counted)
    if not apart:
        monkeypatch.setattr(reconstruct, "apart_blocks", lambda plan, layout: set())
    x = np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32)
    config = QuantConfig(method="flexround", iters=3, early_stop=0, calib_samples=0, verify_samples=0)
    return onnxflex.quantize(_fixed(conv_batchnorm()), {"x": x}, config, progress=False), sizes


def test_a_step_runs_its_micro_batches_as_one_batch_with_their_loss_and_weights(monkeypatch):
    merged, sizes = _quantize(monkeypatch, apart=True)
    learned = sum(b["iters"] > 0 for b in merged.report["blocks"])
    assert learned and sizes == [(8, 1)] * (3 * learned), f"micro-batches (size, accumulate) run: {sizes}"
    apart, sizes = _quantize(monkeypatch, apart=False)
    assert sizes == [(1, 8)] * (3 * 8 * learned), sizes
    for one, other in zip(merged.report["blocks"], apart.report["blocks"]):
        assert one["loss_after"] == pytest.approx(other["loss_after"], rel=1e-4), (one, other)
    weights = {t.name: numpy_helper.to_array(t) for t in apart.model.graph.initializer
               if t.data_type == TensorProto.INT8}
    same = [np.mean(numpy_helper.to_array(t) == weights[t.name]) for t in merged.model.graph.initializer
            if t.name in weights]
    assert same and min(same) >= 0.99, f"share of equal int8 weights per tensor: {same}"



def test_a_max_pool_whose_indices_are_read_does_not():
    """MaxPool's Indices count positions over the whole tensor, the batch's included: only without them is
    the pool per sample."""
    pooled = _conv_then("MaxPool", [], [1, 4, 4, 4], kernel_shape=[2, 2], strides=[2, 2])
    planned = _planned(pooled)
    assert apart_blocks(planned, Layout()) == {b.name for b in planned.blocks}
    pooled.graph.node[-1].output.append("where")
    pooled.graph.output.append(helper.make_tensor_value_info("where", TensorProto.INT64, [1, 4, 4, 4]))
    assert not apart_blocks(_planned(pooled), Layout())


def test_a_block_that_keeps_samples_apart_but_falls_back_to_onnxruntime_runs_at_the_models_batch(monkeypatch):
    """A converter refusing at run time sends such a block to onnxruntime (an OrtBlock), whose extracted
    subgraph holds the model's batch of 1: its calibration and stored outputs run one sample at a time."""
    from onnxflex.rounding import torchify

    forward = torchify.BlockModule.forward
    refused = []

    def refusing(self, feeds, *args, **kwargs):
        if self.block.name == "block0":
            refused.append(self.block.name)
            raise NotImplementedError("refused at run time")
        return forward(self, feeds, *args, **kwargs)

    monkeypatch.setattr(torchify.BlockModule, "forward", refusing)
    x = np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32)
    config = QuantConfig(method="flexround", iters=2, early_stop=0, calib_samples=0, verify_samples=8)
    result = onnxflex.quantize(_fixed(conv_batchnorm()), {"x": x}, config, progress=False)
    runtimes = {b["name"]: b["runtime"] for b in result.report["blocks"]}
    assert refused and runtimes["block0"] == "onnxruntime" and runtimes["block1"] == "torch", runtimes
