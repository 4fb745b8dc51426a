"""The model's head in weight-only runs (head_bits): the MatMul/Gemm that writes the logits gets 8 bits by
default below 8 weight bits (blocked 8-bit weights that onnxruntime runs as MatMulNBits bits=8, or per
channel int8 without a group size), an option chooses its width or keeps it float, and exclusions,
layer_bits and mixed precision win over the default. A head tied to the embedding table (one initializer
read by the Gather and the head) is quantized from its own copy: the Gather keeps reading the float table.
"""
from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import MODELS
from onnxflex import QuantConfig, quantize
from onnxflex.errors import ConfigError
from onnxflex.options import resolve
from onnxflex.ort import session
from onnxflex.planning import build_plan
from onnxflex.verify import optimized_op_counts
from test_decoder import generate, prompt_feeds
from test_decoder import session as decoder_session

DECODER = MODELS / "decoder" / "decoder.onnx"
GENAI = MODELS / "decoder" / "genai" / "model.onnx"
GPT2 = pathlib.Path(__file__).parent / "zoo" / "gpt2_tiny_past.onnx"
HEADS = {DECODER: "/model/lm_head/MatMul", GENAI: "/lm_head/MatMul", GPT2: "/lm_head/MatMul"}
EMBEDDING = "model.model.embed_tokens.weight"  # the decoder's table [128, 64], read by its Gather


def head_of(path: pathlib.Path, **options) -> tuple[int, int] | None:
    """(bits, group size) the plan gives the head of ``path``, or None when it stays float."""
    plan = build_plan(onnx.load(str(path)), resolve(QuantConfig(**options)).plan)
    assert plan.heads == (HEADS[path],), plan.heads
    found = [(l.bits, l.group_size) for l in plan.layers if l.node == HEADS[path]]
    return found[0] if found else None


@pytest.mark.parametrize("path", [DECODER, GENAI, GPT2], ids=["torch-export", "genai-builder", "zoo-gpt2"])
def test_the_head_gets_8_bits_in_weight_only_runs_below_8_bits(path):
    assert head_of(path, wbits=4, abits=0, group_size=128) == (8, 128)
    assert head_of(path, wbits=2, abits=0, group_size=64) == (8, 64)
    assert head_of(path, wbits=3, abits=0) == (8, 0), "per channel without a group size"
    assert head_of(path, wbits=4, abits=0, group_size=32, head_bits=4) == (4, 32)
    assert head_of(path, wbits=4, abits=0, group_size=32, head_bits=0) is None
    assert head_of(path, wbits=4, abits=8) == (4, 0), "activation-quantized runs treat the head like any layer"
    assert head_of(path, wbits=4, abits=0, group_size=32, target="tensorrt") == (8, 0), \
        "tensorrt runs blocked INT4 only: an 8-bit head is per channel there"


def test_exclusions_and_layer_bits_win_over_head_bits():
    head = HEADS[DECODER]
    assert head_of(DECODER, wbits=4, abits=0, group_size=32, exclude_nodes=("*lm_head*",)) is None
    assert head_of(DECODER, wbits=4, abits=0, group_size=32, layer_bits=(("*lm_head*", 3),)) == (3, 32)
    assert head_of(DECODER, wbits=4, abits=0, group_size=32, head_bits=0, layer_bits=((head, 2),)) == (2, 32)
    assert resolve(QuantConfig(wbits=4, abits=0, bits_budget=3.0)).plan.head_bits == 4, \
        "under a budget the allocation chooses the head's bits (from 2 to wbits)"


@pytest.mark.parametrize("changes, message", [
    (dict(abits=0, wbits=4, head_bits=1), r"head_bits=1 is out of range"),
    (dict(abits=0, wbits=4, head_bits=9), r"head_bits=9 is out of range"),
    (dict(abits=0, wbits=4, head_bits=-2), r"head_bits=-2 is out of range"),
    (dict(abits=8, wbits=4, head_bits=8), r"head_bits=8 is for weight-only runs"),
    (dict(abits=0, wbits=4, head_bits=8, bits_budget=3.0), r"budget chooses the head's bits"),
])
def test_bad_head_bits_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**changes)


def test_resolved_head_bits():
    assert [resolve(QuantConfig(**c)).plan.head_bits for c in (
        dict(wbits=4, abits=0), dict(wbits=8, abits=0), dict(wbits=4, abits=8), dict(wbits=3, abits=0, head_bits=0),
        dict(wbits=4, abits=0, size_budget_mb=0.01))] == [8, 8, 4, 0, 4]


def rtn(**options) -> QuantConfig:
    return QuantConfig(wbits=4, abits=0, method="rtn", calib_samples=16, verify_samples=4, latency_rules=False,
                       **options)


def test_a_float_head_and_a_per_channel_head_run_in_onnxruntime():
    calib = str(MODELS / "decoder" / "decoder.calib.npz")
    floated = quantize(str(DECODER), calib, rtn(group_size=32, head_bits=0), progress=False)
    assert floated.report["heads"] == [{"node": HEADS[DECODER], "bits": 0, "group_size": 0}]
    assert optimized_op_counts(floated.model)["MatMulNBits"] == 14, "the head stays a float MatMul"
    channel = quantize(str(DECODER), calib, rtn(), progress=False)
    assert channel.report["heads"] == [{"node": HEADS[DECODER], "bits": 8, "group_size": 0}]
    g = channel.model.graph
    producer = {o: n for n in g.node for o in n.output}
    head = next(n for n in g.node if n.name == HEADS[DECODER])
    dq = producer[head.input[1]]
    inits = {t.name: t for t in g.initializer}
    ints = numpy_helper.to_array(inits[dq.input[0]])
    assert dq.op_type == "DequantizeLinear" and ints.dtype == np.uint8 and ints.max() > 15, \
        (dq, ints.dtype, ints.max())  # per channel (axis 1), asymmetric at W4 (weight_grid auto), 8-bit values
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1] and not any(a.name == "block_size" for a in dq.attribute)
    assert channel.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["logits"] > 60


# ---- tied embeddings: the decoder edited so that its head reads the embedding table ----

def tied_decoder(shared: bool) -> onnx.ModelProto:
    """The decoder with its lm_head reading the embedding table [V, D]: ``shared``: Reshape → Gemm(transB=1)
    on the Gather's own initializer → Reshape back to [N, T, V]; else MatMul(x, Transpose(table))."""
    model = onnx.load(str(DECODER))
    g = model.graph
    k = next(i for i, n in enumerate(g.node) if n.name == "/model/lm_head/MatMul")
    hidden, old = g.node[k].input
    del g.node[k]
    if shared:
        g.initializer.extend([numpy_helper.from_array(np.array([-1, 64], np.int64), "tied_rows"),
                              numpy_helper.from_array(np.array([128], np.int64), "tied_vocab")])
        nodes = [helper.make_node("Reshape", [hidden, "tied_rows"], ["tied_2d"], name="tied_flat"),
                 helper.make_node("Gemm", ["tied_2d", EMBEDDING], ["tied_logits"], name="/model/lm_head/Gemm",
                                  transB=1),
                 helper.make_node("Shape", [hidden], ["tied_shape"], name="tied_shape", end=2),
                 helper.make_node("Concat", ["tied_shape", "tied_vocab"], ["tied_out"], name="tied_cat", axis=0),
                 helper.make_node("Reshape", ["tied_logits", "tied_out"], ["logits"], name="tied_back")]
    else:
        nodes = [helper.make_node("Transpose", [EMBEDDING], ["tied_t"], name="tied_transpose", perm=[1, 0]),
                 helper.make_node("MatMul", [hidden, "tied_t"], ["logits"], name="/model/lm_head/MatMul")]
    for offset, node in enumerate(nodes):
        g.node.insert(k + offset, node)
    del g.initializer[[t.name for t in g.initializer].index(old)]
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("shared", [True, False], ids=["shared-initializer", "through-transpose"])
def test_a_tied_head_is_quantized_and_the_gather_keeps_the_float_table(shared, tmp_path):
    model = tied_decoder(shared)
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == EMBEDDING))
    calib = str(MODELS / "decoder" / "decoder.calib.npz")
    result = quantize(model, calib, rtn(group_size=32), progress=False)
    head = "/model/lm_head/Gemm" if shared else "/model/lm_head/MatMul"
    assert result.report["heads"] == [{"node": head, "bits": 8, "group_size": 32}], result.report["heads"]
    assert optimized_op_counts(result.model)["MatMulNBits"] == 15, "the tied head runs as MatMulNBits too"
    g = result.model.graph
    gather = next(n for n in g.node if n.op_type == "Gather" and "embed_tokens" in n.name)
    inits = {t.name: t for t in g.initializer}
    assert gather.input[0] == EMBEDDING and np.array_equal(numpy_helper.to_array(inits[EMBEDDING]), table), \
        f"the Gather reads {gather.input[0]!r}, not the float table"

    # onnxruntime: the Gather's output is the float rows of the table; the logits track the FP32 model's
    probe = onnx.ModelProto()
    probe.CopyFrom(result.model)
    probe.graph.output.append(helper.make_tensor_value_info(gather.output[0], TensorProto.FLOAT, None))
    ids = np.load(MODELS / "decoder" / "decoder.eval.npz")["input_ids"][:4, :16]
    rows = session(probe, ["CPUExecutionProvider"]).run([gather.output[0]], prompt_feeds(ids))[0]
    np.testing.assert_array_equal(rows, table[ids])
    prompts = ids[:, :8]
    fp_tokens, fp_logits = generate(decoder_session(model), prompts)
    tokens, logits = generate(decoder_session(result.model), prompts, forced=fp_tokens)
    error = float(np.linalg.norm(logits - fp_logits) / np.linalg.norm(fp_logits))
    assert error < 0.15, f"tied head W4 g32 (head 8 bits): logits relative error {error:.4f} over 32 cached steps"
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["logits"]
    assert sim > 60, f"onnxruntime vs the torch simulation {sim:.1f} dB: the Gather reads other values in one of them"


def test_head_bits_from_the_cli_and_a_config_file(tmp_path):
    from click.testing import CliRunner

    from onnxflex.cli import main

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    shown = invoke("inspect", DECODER, "--abits", "0", "--wbits", "4", "--group-size", "128")
    assert shown.exit_code == 0 and f"heads: {HEADS[DECODER]} (8 bits, groups of 128)" in shown.stdout, shown.stdout
    floated = invoke("inspect", DECODER, "--abits", "0", "--wbits", "4", "--head-bits", "0")
    assert f"heads: {HEADS[DECODER]} (float)" in floated.stdout, floated.stdout
    refused = invoke("inspect", DECODER, "--head-bits", "4")
    assert refused.exit_code == 2 and "head_bits=4 is for weight-only runs" in refused.stderr, refused.stderr
    path = tmp_path / "q.toml"
    path.write_text("abits = 0\nwbits = 3\ngroup_size = 64\nhead_bits = 6\n")
    assert QuantConfig.from_toml(path).head_bits == 6
    assert head_of(DECODER, abits=0, wbits=3, group_size=64, head_bits=6) == (6, 64)
    dumped = invoke("quantize", "--dump-config", "--config", path)
    assert "head_bits = 6" in dumped.stdout, dumped.stdout
