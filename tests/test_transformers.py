"""Transformers end to end on the bundled ViT and tiny causal LM (models/make_digits_vit.py, make_tiny_lm.py).

W8A8 with the default method (FlexRound): the ViT keeps its top-1 within a point of FP32, the LM its
perplexity close to FP32, both verify (onnxruntime vs onnxflex's simulation). The block plan puts one
transformer layer in one block, and the LM's attention-mask and causal-mask side tensors do not stop
the cuts: every block that needs them recomputes them from the graph inputs.
"""
from __future__ import annotations

import collections
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnxflex
from helpers import MODELS, run_model, top1
from onnxflex.cli import main
from onnxflex.config import QuantConfig
from onnxflex.options import resolve
from onnxflex.pipeline import build_plan

VIT = MODELS / "digits_vit.onnx"
LM = MODELS / "tiny_lm.onnx"
LAYERS = 4
# Short reconstruction keeps the file's run time modest; the bounds below hold with margin at these settings.
VIT_CONFIG = dict(iters=60, batch_size=16, calib_samples=80, verify_samples=16)
LM_CONFIG = dict(iters=60, batch_size=16, calib_samples=64, verify_samples=16)
LM_FEEDS = ("input_ids", "attention_mask")


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean cross-entropy) of [M, T, V] logits against [M, T] int targets."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(log_probs, targets[..., None], -1).mean()))


@pytest.fixture(scope="module")
def vit_eval():
    with np.load(MODELS / "digits_vit.eval.npz") as data:
        return {"input": data["input"], "labels": data["labels"]}


@pytest.fixture(scope="module")
def lm_eval():
    with np.load(MODELS / "tiny_lm.eval.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def quantized_vit():
    return onnxflex.quantize(VIT, config=QuantConfig(**VIT_CONFIG), progress=False)


@pytest.fixture(scope="module")
def quantized_lm():
    return onnxflex.quantize(LM, config=QuantConfig(**LM_CONFIG), progress=False)


@pytest.mark.parametrize("path", [VIT, LM], ids=["vit", "lm"])
def test_bundled_exports_load_in_onnxruntime(path):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 13, f"{path.name}: IR {model.ir_version} is newer than onnxruntime 1.31 reads"
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    ops = {n.op_type for n in model.graph.node}
    assert {"LayerNormalization", "Softmax", "Erf", "MatMul"} <= ops, f"{path.name}: {sorted(ops)}"


def test_lm_matmul_weights_fit_groups_of_32():
    model = onnx.load(str(LM))
    inits = {t.name: t for t in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weights) == 6 * LAYERS + 1
    bad = {w.name: list(w.dims) for w in weights if w.dims[0] % 32}
    assert not bad, f"MatMul weights whose input dimension is not a multiple of 32: {bad}"


@pytest.mark.parametrize("path, first_layer_block", [(VIT, 1), (LM, 0)], ids=["vit", "lm"])
def test_block_plan_has_one_block_per_transformer_layer(path, first_layer_block):
    plan = build_plan(onnx.load(str(path)), resolve(QuantConfig(latency_rules=False)).plan)  # the ViT's patch conv too
    by_name = {n.name: n for n in plan.model.graph.node}
    softmax = [sum(by_name[n].op_type == "Softmax" for n in b.nodes) for b in plan.blocks]
    layers = slice(first_layer_block, first_layer_block + LAYERS)
    assert softmax[layers] == [1] * LAYERS and sum(softmax) == LAYERS, f"Softmax per block: {softmax}"
    assert [len(b.layers) for b in plan.blocks[layers]] == [6] * LAYERS, plan.describe()
    assert len(plan.blocks) == first_layer_block + LAYERS + 1, plan.describe()  # + the head's block


def test_lm_side_tensors_are_recomputed_not_captured():
    """Each layer block reads one float tensor (the residual stream) and the graph's int inputs; the
    mask nodes it repeats make only int/bool/mask tensors, so every node outside them is in one block."""
    plan = build_plan(onnx.load(str(LM)), resolve(QuantConfig()).plan)
    g = plan.model.graph
    float_inputs = {i.name for i in g.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    for block in plan.blocks[1:]:
        stream = [t for t in block.inputs if t not in LM_FEEDS]
        assert len(stream) == 1 and not float_inputs & set(block.inputs), f"{block.name} reads {block.inputs}"
    owners = collections.Counter(n for b in plan.blocks for n in b.nodes)
    assert set(owners) == {n.name for n in g.node}, "every node is in a block"
    repeated = [n for n in g.node if owners[n.name] > 1]
    assert repeated, "the causal and padding masks are made once and read by every layer"
    ops = collections.Counter(n.op_type for n in repeated)
    assert not ops.keys() & {"MatMul", "Softmax", "LayerNormalization"}, f"repeated nodes: {dict(ops)}"
    layer_plan = build_plan(onnx.load(str(LM)), resolve(QuantConfig(granularity="layer")).plan)
    side = {o for n in repeated for o in n.output}
    assert not any(side & set(b.inputs) for b in layer_plan.blocks), "a side tensor crosses a layer block"


def test_inspect_prints_one_block_per_layer():
    result = CliRunner().invoke(main, ["inspect", str(LM)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{LAYERS + 1} blocks, {6 * LAYERS + 1} quantizable layers"), result.output


def test_vit_w8a8_top1_within_a_point_of_fp32(quantized_vit, vit_eval):
    fp32 = top1(run_model(VIT, {"input": vit_eval["input"]})[0], vit_eval["labels"])
    q = top1(run_model(quantized_vit.model, {"input": vit_eval["input"]})[0], vit_eval["labels"])
    print(f"\ndigits ViT eval top-1: FP32 {fp32:.2f}%, W8A8 FlexRound {q:.2f}%", file=sys.stderr)
    assert q >= fp32 - 1.0, f"W8A8 top-1 {q:.2f}% vs FP32 {fp32:.2f}% (more than 1 point lower)"
    sim = quantized_vit.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["logits"]
    assert sim >= 35.0, f"onnxruntime vs simulation SQNR {sim:.1f} dB < 35 dB"
    assert {b["runtime"] for b in quantized_vit.report["blocks"]} == {"torch"}


def test_lm_w8a8_perplexity_close_to_fp32(quantized_lm, lm_eval):
    feeds = {k: lm_eval[k] for k in LM_FEEDS}
    fp32 = perplexity(run_model(LM, feeds)[0], lm_eval["targets"])
    q = perplexity(run_model(quantized_lm.model, feeds)[0], lm_eval["targets"])
    print(f"\ntiny LM eval perplexity: FP32 {fp32:.3f}, W8A8 FlexRound {q:.3f}", file=sys.stderr)
    assert q <= fp32 * 1.03, f"W8A8 perplexity {q:.3f} vs FP32 {fp32:.3f} (more than 3% higher)"
    verification = quantized_lm.report["verification"]
    sim = verification["onnxruntime_vs_simulation_sqnr_db"]["logits"]
    assert sim >= 35.0, f"onnxruntime vs simulation SQNR {sim:.1f} dB < 35 dB"
    assert {b["runtime"] for b in quantized_lm.report["blocks"]} == {"torch"}
    ops = verification["optimized_graph_ops"]
    assert ops.get("QLinearMatMul", 0) == 6 * LAYERS + 1, f"weighted MatMuls not fused to integer kernels: {ops}"


def test_lm_quantized_weights_are_per_output_column(quantized_lm):
    g = quantized_lm.model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    weighted = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in producer
                and producer[n.input[1]].op_type == "DequantizeLinear"
                and producer[n.input[1]].input[0] in inits]
    assert len(weighted) == 6 * LAYERS + 1
    for node in weighted:
        dq = producer[node.input[1]]
        w = inits[dq.input[0]]
        axis = {a.name: a.i for a in dq.attribute}.get("axis", 1)
        assert w.data_type == onnx.TensorProto.INT8 and axis == 1, node.name
        assert list(numpy_helper.to_array(inits[dq.input[1]]).shape) == [w.dims[1]], node.name


def test_quantized_lm_keeps_dynamic_batch_and_length(quantized_lm, lm_eval):
    ids = lm_eval["input_ids"][:3, :17]
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding in one row
    logits = run_model(quantized_lm.model, {"input_ids": ids, "attention_mask": mask})[0]
    reference = run_model(LM, {"input_ids": ids, "attention_mask": mask})[0]
    assert logits.shape == (3, 17, 128)
    agree = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    assert agree >= 0.9, f"W8A8 and FP32 agree on {agree:.0%} of next-character predictions at length 17"


@pytest.mark.parametrize("upper, k, dtype", [(1, 1, np.float32), (0, 0, np.float32), (1, -2, np.bool_),
                                             (0, 3, np.int64)])
def test_trilu_converter_matches_onnxruntime(upper, k, dtype):
    """Causal masks exported through torch.triu/tril arrive as Trilu (opset 14)."""
    import torch
    from onnx import helper

    from onnxflex.rounding.converters import OpNode, find_converter

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("Trilu", ["x", "k"], ["y"], name="trilu", upper=upper)
    graph = helper.make_graph([node], "trilu", [helper.make_tensor_value_info("x", elem, [2, 5, 6])],
                              [helper.make_tensor_value_info("y", elem, [2, 5, 6])],
                              [numpy_helper.from_array(np.array(k, np.int64), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = (np.random.default_rng(0).standard_normal((2, 5, 6)) * 3).astype(dtype)
    expected = run_model(model, {"x": x})[0]
    got = find_converter("Trilu", 17)(OpNode.from_proto(node, 17), [torch.from_numpy(x), torch.tensor(k)])[0]
    np.testing.assert_array_equal(got.numpy(), expected)
