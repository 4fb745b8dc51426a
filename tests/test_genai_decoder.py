"""The decoder in onnxruntime-genai's form (models/decoder/genai: the builder's GroupQueryAttention,
SkipSimplifiedLayerNormalization and SimplifiedLayerNormalization, the last an onnxruntime op written in
the default domain) through onnxflex: ops onnxruntime registers in the default domain are lowered to
standard ONNX so the emitted model passes onnx.checker, the model is reconstructed in torch one block
per decoder layer, and its W4 g32 models (rtn, flexround, signround) run in onnxruntime with the cache.
"""
from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import parser

from helpers import MODELS
from test_decoder import check_g128, nbits_kernels
from onnxflex import QuantConfig, quantize
from onnxflex.generate import decoder_io, greedy
from onnxflex.options import resolve
from onnxflex.passes.kv_cache import cache_tensors
from onnxflex.passes.pipeline import PassContext, run_passes
from onnxflex.planning import build_plan
from onnxflex.verify import optimized_op_counts

GENAI = MODELS / "decoder" / "genai" / "model.onnx"
LAYERS = 2
GENAI_IO = decoder_io(onnx.load(str(GENAI)), "the builder form", (GENAI,))
RMS_NORM = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, T, 8] x) => (float[N, T, 8] y) <float[8] gamma = {1.0, 2.0, 0.5, -1.0, 3.0, 0.25, 1.5, -2.0}> {
        y = SimplifiedLayerNormalization <axis = AXIS, epsilon = 0.01> (x, gamma)
    }"""


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def canonical(model: onnx.ModelProto) -> onnx.ModelProto:
    return run_passes(model, PassContext(resolve(QuantConfig()).plan))


def test_a_default_domain_simplified_layer_norm_becomes_standard_ops_onnxruntime_fuses_back():
    model = parser.parse_model(RMS_NORM.replace("AXIS", "-1"))
    with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(model, full_check=True)
    lowered = canonical(model)
    onnx.checker.check_model(lowered, full_check=True)
    assert [n.op_type for n in lowered.graph.node] == ["Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]
    assert optimized_op_counts(lowered) == {"SimplifiedLayerNormalization": 1}
    x = {"x": np.random.default_rng(0).normal(0, 3, (2, 5, 8)).astype(np.float32)}
    expected, got = session(model).run(None, x)[0], session(lowered).run(None, x)[0]
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max(), np.abs(got - expected).max()


def test_a_simplified_layer_norm_without_a_lowering_is_kept():
    """A non-negative axis needs the rank, which a lowering does not assume: the node stays as written."""
    lowered = canonical(parser.parse_model(RMS_NORM.replace("AXIS", "2")))
    assert [n.op_type for n in lowered.graph.node] == ["SimplifiedLayerNormalization"]


def generate(sess: ort.InferenceSession, prompt: np.ndarray, steps: int,
             forced: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """onnxflex.generate's greedy loop with the cache, ``forced`` [M, steps] fed instead of the argmax
    when given: (argmax tokens [M, steps], last-position logits [M, steps, V])."""
    return greedy(sess, GENAI_IO, prompt, steps, forced)


def w4_config(method: str) -> QuantConfig:
    """test_decoder.py's W4 g32 settings: the learned methods take 40 steps of 8 samples per block."""
    learned = {} if method == "rtn" else {"iters": 40, "batch_size": 8, "early_stop": 0, "step_budget": 0.0}
    return QuantConfig(wbits=4, abits=0, group_size=32, method=method, preset="fast", calib_samples=48,
                       verify_samples=8, latency_rules=False, seed=0, **learned)


@pytest.fixture(scope="module")
def calib_path(tmp_path_factory):
    calib = dict(np.load(MODELS / "decoder" / "decoder.calib.npz"))
    del calib["position_ids"]  # the builder's model takes none: GroupQueryAttention counts positions
    path = tmp_path_factory.mktemp("genai") / "calib.npz"
    np.savez(path, **calib)
    return str(path)


@pytest.fixture(scope="module")
def quantized(calib_path):
    return {method: quantize(str(GENAI), calib_path, w4_config(method), progress=False)
            for method in ("rtn", "flexround", "signround")}


@pytest.fixture(scope="module")
def prompts_and_fp32():
    prompts = np.load(MODELS / "decoder" / "decoder.eval.npz")["input_ids"][:12, :32]
    return prompts, generate(session(GENAI), prompts, 32)


def test_cache_tensors_are_what_group_query_attention_reads_and_returns():
    past = {f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")}
    assert cache_tensors(onnx.load(str(GENAI))) == past | {p.replace("past_key_values", "present") for p in past}


def test_one_torch_block_per_decoder_layer_and_one_for_the_head():
    plan = build_plan(onnx.load(str(GENAI)), resolve(w4_config("rtn")).plan)
    layers = [sorted({re.search(r"layers\.\d+|lm_head", layer.node).group() for layer in b.layers})
              for b in plan.blocks]
    assert layers == [["layers.0"], ["layers.1"], ["lm_head"]], plan.describe()
    assert not any(b.unsupported for b in plan.blocks), [b.unsupported for b in plan.blocks]
    for k, block in enumerate(plan.blocks[:LAYERS]):
        assert {f"past_key_values.{k}.key", f"past_key_values.{k}.value"} <= set(block.inputs), block.inputs
        assert {f"present.{k}.key", f"present.{k}.value"} <= set(block.outputs), block.outputs
    crossing = [i for i in plan.blocks[1].inputs if i.startswith("/model/layers")]
    assert sorted(crossing) == ["/model/layers.1/input_layernorm/output_0",
                                "/model/layers.1/input_layernorm/output_3"], crossing


@pytest.mark.parametrize("method", ["rtn", "flexround", "signround"])
def test_w4_g32_of_the_builder_form_passes_the_checker_and_generates_with_the_cache(method, quantized,
                                                                                     prompts_and_fp32):
    result = quantized[method]
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["SimplifiedLayerNormalization"] == 0 and ops["GroupQueryAttention"] == LAYERS, ops
    assert optimized_op_counts(model)["MatMulNBits"] == 11
    assert nbits_kernels(model) == {("layer", 4, 32): 10, ("lm_head", 8, 32): 1}, "the lm_head at 8 bits (head_bits)"
    assert [b["runtime"] for b in result.report["blocks"]] == ["torch"] * 3, result.report["blocks"]
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]
    assert min(sim.values()) > 60, f"onnxruntime vs the torch simulation: {sim}"

    # as in test_decoder.py: 32 teacher-forced greedy steps, with that file's bounds
    prompts, (fp_tokens, fp_logits) = prompts_and_fp32
    tokens, logits = generate(session(model), prompts, 32, forced=fp_tokens)
    agree = float((tokens == fp_tokens).mean())
    error = float(np.linalg.norm(logits - fp_logits) / np.linalg.norm(fp_logits))
    print(f"\nbuilder form, {method} W4 g32: argmax agreement {agree:.3f}, logits relative error {error:.4f}")
    assert agree >= 0.83, f"{method}: argmax agreement {agree:.3f} < 0.83 over 32 cached steps"
    assert error < 0.08, f"{method}: logits relative error {error:.4f} >= 0.08"


def test_learned_rounding_beats_rtn_on_the_builder_form(quantized, prompts_and_fp32):
    prompts, (fp_tokens, fp_logits) = prompts_and_fp32
    errors = {}
    for method, result in quantized.items():
        logits = generate(session(result.model), prompts, 32, forced=fp_tokens)[1]
        errors[method] = float(np.linalg.norm(logits - fp_logits) / np.linalg.norm(fp_logits))
    for method in ("flexround", "signround"):
        assert errors[method] < 0.8 * errors["rtn"], f"{method} does not beat RTN by 20 %: {errors}"


@pytest.fixture(scope="module")
def quantized_g128(calib_path):
    return {method: quantize(str(GENAI), calib_path, dataclasses.replace(w4_config(method), group_size=128),
                             progress=False) for method in ("rtn", "flexround", "signround")}


@pytest.mark.parametrize("method", ["flexround", "signround"])
def test_w4_g128_of_the_builder_form_learns_and_generates_with_the_cache(method, quantized_g128, prompts_and_fp32):
    """test_decoder.py's g128 check on the builder's form (fused qkv_proj [64, 128]: one short group)."""
    prompts, (fp_tokens, fp_logits) = prompts_and_fp32
    runs = {m: generate(session(quantized_g128[m].model), prompts, 32, forced=fp_tokens)[1] for m in ("rtn", method)}
    onnx.checker.check_model(quantized_g128[method].model, full_check=True)
    assert quantized_g128[method].report["reconstruction"]["steps_run"] > 0
    check_g128(quantized_g128[method], fp_logits, runs[method], runs["rtn"], 10)


def genai_generate(folder, prompts: np.ndarray, steps: int) -> np.ndarray:
    """onnxruntime-genai's greedy search from ``folder`` (its genai_config.json and tokenizer files):
    [M, steps] tokens, one prompt at a time."""
    og = pytest.importorskip("onnxruntime_genai")  # .ci/run installs it; a machine without it skips here
    model = og.Model(str(folder))
    og.Tokenizer(model)  # the tokenizer files were copied beside the quantized model
    rows = []
    for prompt in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt[None].astype(np.int32))
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        rows.append(tokens)
    return np.array(rows)


@pytest.mark.parametrize("method", ["rtn", "flexround", "signround"])
def test_the_quantized_builder_form_loads_in_onnxruntime_genai_and_generates_as_onnxruntime_does(
        method, quantized, prompts_and_fp32, tmp_path):
    """Saved to a folder of its own, each W4 g32 model (MatMulNBits, GroupQueryAttention with the cache) is
    what onnxruntime-genai loads: its greedy tokens over 32 steps are those of onnxflex's greedy loop in
    onnxruntime on the same file, and follow FP32's as test_w4_g32... bounds them."""
    path = quantized[method].save(tmp_path / method / "model.onnx")
    prompts = prompts_and_fp32[0][:4]
    tokens = genai_generate(path.parent, prompts, 32)
    expected = generate(session(str(path)), prompts, 32)[0]
    assert tokens.shape == expected.shape == (4, 32)
    same = float((tokens == expected).mean())
    assert same >= 0.95, f"onnxruntime-genai vs onnxruntime on the same model: {same:.3f} of the tokens agree"
