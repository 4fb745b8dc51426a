"""Weight-only mode (abits 0, group_size G): blocked 4-bit MatMul weights that onnxruntime runs as MatMulNBits.

Per group of G input channels one step (scale [K/G, N] for a MatMul weight [K, N]); the integers (2-4
bits) are written as packed UINT4 with UINT4 zero points (weight_grid auto: asymmetric on onnxruntime;
tests/test_weight_grids.py has the symmetric INT4 form) with DequantizeLinear(axis 0, block_size G), opset 21. On the bundled
tiny LM at W4 and W3 with groups of 32, the learned rounders (FlexRound, SignRound) beat round-to-nearest
in perplexity and in KL divergence to FP32, with a larger perplexity gain at 3 bits than at 4. Models run
in onnxflex's sessions (ort.session): MatMulNBits at accuracy level 0, float activations, as the
simulation computes them.
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, parser

import onnxflex
from helpers import MODELS
from onnxflex.options import resolve
from onnxflex.ort import MATMULNBITS_ACCURACY_LEVEL, session, session_options
from onnxflex.check import check
from onnxflex.config import QuantConfig
from onnxflex.emit.pack import unpack_int4
from onnxflex.errors import ConfigError, UnsupportedModelError
from onnxflex.pipeline import build_plan
from onnxflex.verify import optimized_op_counts
from test_transformers import LM, LM_FEEDS, perplexity

GROUP = 32
LM_MATMULS = 25  # 6 per layer × 4 layers + the head
LM_HEAD = "/head/MatMul"  # 8-bit by default in weight-only runs (head_bits), blocked like the others
# Short reconstruction keeps the file's run time modest; the orderings asserted below hold at these settings.
LM_WEIGHT_ONLY = dict(abits=0, group_size=GROUP, iters=100, batch_size=16, calib_samples=64, verify_samples=16)

_RUNS: dict[tuple, onnxflex.QuantResult] = {}


@pytest.fixture(scope="session")
def weight_only_lm():
    """``weight_only_lm(method, wbits)`` quantizes the tiny LM weight-only once per pair in the session."""

    def run(method: str, wbits: int) -> onnxflex.QuantResult:
        key = (method, wbits)
        if key not in _RUNS:
            _RUNS[key] = onnxflex.quantize(LM, config=QuantConfig(method=method, wbits=wbits, **LM_WEIGHT_ONLY),
                                           progress=False)
        return _RUNS[key]

    return run


@pytest.fixture(scope="module")
def lm_eval():
    with np.load(MODELS / "tiny_lm.eval.npz") as data:
        return {k: data[k] for k in data.files}


def lm_scores(model, lm_eval, fp_log_probs=None) -> tuple[float, float, np.ndarray]:
    """(perplexity, mean KL(FP32 || model) per token, log-probabilities) on the eval set."""
    sess = session(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)), ["CPUExecutionProvider"])
    logits = sess.run(["logits"], {k: lm_eval[k] for k in LM_FEEDS})[0]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    kl = 0.0 if fp_log_probs is None else float((np.exp(fp_log_probs) * (fp_log_probs - log_probs)).sum(-1).mean())
    return perplexity(logits, lm_eval["targets"]), kl, log_probs


@pytest.fixture(scope="module")
def lm_table(weight_only_lm, lm_eval):
    """{'fp32' | 'METHOD WBITS': (perplexity, KL to FP32)} on the eval set."""
    fp_ppl, _, fp_log_probs = lm_scores(LM, lm_eval)
    table = {"fp32": (fp_ppl, 0.0)}
    for wbits in (4, 3):
        for method in ("rtn", "flexround", "signround"):
            table[f"{method} W{wbits}"] = lm_scores(weight_only_lm(method, wbits).model, lm_eval, fp_log_probs)[:2]
    print(f"\ntiny LM eval, weight-only g{GROUP}: {describe(table)}", file=sys.stderr)
    return table


def describe(table) -> str:
    return ", ".join(f"{k} ppl {p:.4f} KL {kl:.4f}" for k, (p, kl) in table.items())


# The bundled LM is calibrated (its eval perplexity is lowest at softmax temperature 1), so a
# quantized model cannot gain perplexity by blurring overconfident predictions: perplexity follows
# fidelity. Measured when the model was made (630 eval sequences): the W4 gains over RTN are 6.8 and
# 3.9 paired standard errors of the per-sequence NLL difference, the W3 gains 19 and 16.


@pytest.mark.parametrize("wbits", [4, 3])
@pytest.mark.parametrize("method", ["flexround", "signround"])
def test_learned_rounders_are_closer_to_fp32_than_rtn(lm_table, method, wbits):
    rtn, learned = lm_table[f"rtn W{wbits}"][1], lm_table[f"{method} W{wbits}"][1]
    assert learned < 0.75 * rtn, (f"W{wbits} g32 KL to FP32: {method} {learned:.5f} not below 0.75 × RTN's "
                                  f"{rtn:.5f} ({describe(lm_table)})")


@pytest.mark.parametrize("wbits", [4, 3])
@pytest.mark.parametrize("method", ["flexround", "signround"])
def test_learned_rounders_perplexity_below_rtn(lm_table, method, wbits):
    rtn, learned = lm_table[f"rtn W{wbits}"][0], lm_table[f"{method} W{wbits}"][0]
    assert learned < rtn, (f"W{wbits} g32 perplexity: {method} {learned:.4f} not below RTN {rtn:.4f} "
                           f"({describe(lm_table)})")


@pytest.mark.parametrize("method", ["flexround", "signround"])
def test_gap_over_rtn_is_larger_at_3_bits(lm_table, method):
    gaps = {bits: lm_table[f"rtn W{bits}"][0] - lm_table[f"{method} W{bits}"][0] for bits in (4, 3)}
    assert gaps[3] > gaps[4], (f"{method}'s perplexity gain over RTN: W3 {gaps[3]:.4f}, W4 {gaps[4]:.4f} "
                               f"({describe(lm_table)})")


@pytest.mark.parametrize("method", ["rtn", "flexround", "signround"])
def test_lm_weight_only_runs_as_matmulnbits_and_matches_the_simulation(weight_only_lm, method):
    result = weight_only_lm(method, 4)
    verification = result.report["verification"]
    ops = verification["optimized_graph_ops"]
    assert ops.get("MatMulNBits", 0) == LM_MATMULS, f"{method}: weighted MatMuls not fused to MatMulNBits: {ops}"
    sim = verification["onnxruntime_vs_simulation_sqnr_db"]["logits"]
    print(f"\n{method} W4 g32: onnxruntime (MatMulNBits, accuracy level {MATMULNBITS_ACCURACY_LEVEL}) vs "
          f"simulation SQNR {sim:.1f} dB", file=sys.stderr)
    assert sim >= 60.0, f"{method}: onnxruntime vs simulation SQNR {sim:.1f} dB < 60 dB"
    rows = [r for r in result.report["layers"] if r["op_type"] == "MatMul"]
    assert len(rows) == LM_MATMULS and {r["group_size"] for r in rows} == {GROUP}, rows[:2]
    body, head = [r for r in rows if r["node"] != LM_HEAD], [r for r in rows if r["node"] == LM_HEAD]
    assert all(0 <= r["int_min"] and r["int_max"] <= 15 for r in body)  # asymmetric by default (weight_grid auto)
    assert [r["bits"] for r in head] == [8] and 15 < head[0]["int_max"] <= 255, head  # head_bits -1: 8 bits
    assert result.report["heads"] == [{"node": LM_HEAD, "bits": 8, "group_size": GROUP}]


def test_verification_session_runs_matmulnbits_at_accuracy_level_0(weight_only_lm, tmp_path):
    """onnxruntime's QDQ fusion defaults to accuracy level 4 (int8 activations); onnxflex asks for 0."""
    path = tmp_path / "optimized.onnx"
    opts = session_options()
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(weight_only_lm("rtn", 4).model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    levels = {helper.get_attribute_value(a) for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {int(MATMULNBITS_ACCURACY_LEVEL)} == {0}, f"MatMulNBits accuracy levels {levels}"


def test_lm_weight_only_graph_and_bytes(weight_only_lm):
    model = weight_only_lm("flexround", 3).model
    onnx.checker.check_model(model, full_check=True)
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    assert opset == 21 and model.ir_version <= 13, f"opset {opset}, IR {model.ir_version}"
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    fp32 = {t.name: t for t in onnx.load(str(LM)).graph.initializer}
    fp_matmul = [n for n in onnx.load(str(LM)).graph.node if n.op_type == "MatMul" and n.input[1] in fp32]
    fp_bytes = sum(numpy_helper.to_array(fp32[n.input[1]]).nbytes for n in fp_matmul)
    q_bytes = 0
    weighted = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in producer
                and producer[n.input[1]].op_type == "DequantizeLinear" and producer[n.input[1]].input[0] in inits]
    written = [n for n in g.node if n.op_type == "MatMulNBits"]  # the 4-bit layers onnxflex writes itself
    assert len(weighted) + len(written) == len(fp_matmul) == LM_MATMULS
    for node in weighted:
        dq = producer[node.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert len(dq.input) == 3, f"{node.name}: a zero point expected (weight_grid auto: asymmetric at W3)"
        w, s, z = (inits[name] for name in dq.input)
        dtype = TensorProto.UINT8 if node.name == LM_HEAD else TensorProto.UINT4
        assert w.data_type == z.data_type == dtype and attrs == {"axis": 0, "block_size": GROUP}, \
            (node.name, attrs)
        k, n = w.dims
        assert list(s.dims) == list(z.dims) == [k // GROUP, n] and s.data_type == TensorProto.FLOAT, \
            (node.name, list(s.dims))
        if node.name == LM_HEAD:
            ints = numpy_helper.to_array(w)
            assert ints.max() > 7, f"the head at 8 bits uses [{ints.min()}, {ints.max()}] only"
        else:
            ints = unpack_int4(np.frombuffer(w.raw_data, np.uint8), k * n, signed=False)
            assert ints.max() <= 7, f"{node.name}: W3 integers in [{ints.min()}, {ints.max()}]"
        q_bytes += len(w.raw_data) + numpy_helper.to_array(s).nbytes + len(z.raw_data)
    for node in written:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.name != LM_HEAD and attrs["bits"] == 4 and attrs["block_size"] == GROUP, (node.name, attrs)
        assert len(node.input) == 4, f"{node.name}: zero points expected (weight_grid auto: asymmetric at W3)"
        b, s, z = (inits[name] for name in node.input[1:])
        k, n = attrs["K"], attrs["N"]
        assert list(b.dims) == [n, k // GROUP, GROUP // 2] and list(s.dims) == [n * k // GROUP], (node.name, b.dims)
        ints = unpack_int4(numpy_helper.to_array(b).reshape(-1), k * n, signed=False)
        assert ints.max() <= 7, f"{node.name}: W3 integers in [{ints.min()}, {ints.max()}]"
        q_bytes += numpy_helper.to_array(b).nbytes + numpy_helper.to_array(s).nbytes + numpy_helper.to_array(z).nbytes
    ratio = fp_bytes / q_bytes
    print(f"\nMatMul weight bytes: FP32 {fp_bytes}, UINT4 + scales + zero points {q_bytes} ({ratio:.2f}x smaller)",
          file=sys.stderr)
    assert ratio >= 3.5, f"MatMul weights shrink {ratio:.2f}x (FP32 {fp_bytes} B, quantized {q_bytes} B) < 3.5x"


# ---- small models built in code ----

def matmul_gemm_model(k: int = 64, n: int = 16) -> onnx.ModelProto:
    """x [B, k] → MatMul(W [k, n]) → Relu → Gemm(W2 [n, 8], b) → y."""
    rng = np.random.default_rng(0)
    model = parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[B, {k}] x) => (float[B, 8] y) {{
            h = MatMul(x, w)
            r = Relu(h)
            y = Gemm(r, w2, b)
        }}""")
    model.graph.initializer.extend([
        numpy_helper.from_array((rng.standard_normal((k, n)) * 0.1).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal((n, 8)) * 0.1).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b")])
    return model


def test_small_model_blocks_matmul_and_gemm_weights():
    """MatMul and Gemm [K, N] weights both get groups along K and run as MatMulNBits."""
    rng = np.random.default_rng(1)
    calib = {"x": rng.standard_normal((64, 64)).astype(np.float32)}
    config = QuantConfig(method="flexround", wbits=4, abits=0, group_size=16, head_bits=4, iters=20, batch_size=16,
                         verify_samples=16)  # the Gemm writes the output: a head, 8-bit unless told otherwise
    result = onnxflex.quantize(matmul_gemm_model(), calib, config, progress=False)
    g = result.model.graph
    inits = {t.name: t for t in g.initializer}
    dqs = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    by_op = {n.op_type: n for n in g.node}
    # onnxruntime 1.31 would leave this MatMul (-> Relu) unfused, so it is written as MatMulNBits
    # (emit/nbits.py): 16 columns of 4 blocks, their zero points two to a byte
    mm, gemm = by_op["MatMulNBits"], dqs[by_op["Gemm"].input[1]]
    assert [list(inits[name].dims) for name in mm.input[1:]] == [[16, 4, 8], [64], [32]]
    assert inits[gemm.input[0]].data_type == TensorProto.UINT4 and list(inits[gemm.input[1]].dims) == [1, 8]
    assert [l["group_size"] for l in result.report["layers"]] == [16, 16]
    kernels = {layer.node: layer.kernel for layer in check(result.model).layers}
    assert set(kernels.values()) == {"MatMulNBits"}, kernels
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 60.0, f"onnxruntime vs simulation SQNR {sim:.1f} dB < 60 dB"


def test_a_transposed_gemm_weight_is_stored_k_by_n_and_runs_as_matmulnbits():
    """torch's Linear exports Gemm(transB=1) with weight [N, K]; onnxruntime fuses a blocked weight into
    MatMulNBits only as [K, N] (else the Gemm runs in float), so weight-only runs transpose it first."""
    model = matmul_gemm_model()
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    gemm.attribute.append(onnx.helper.make_attribute("transB", 1))
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w2).T.copy(), "w2"))
    calib = {"x": np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)}
    result = onnxflex.quantize(model, calib, QuantConfig(method="rtn", wbits=4, abits=0, group_size=16, head_bits=4,
                                                         verify_samples=16), progress=False)
    emitted = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    assert not any(a.name == "transB" and a.i for a in emitted.attribute), emitted
    kernels = {layer.node: layer.kernel for layer in check(result.model).layers}
    assert kernels["Gemm"] == "MatMulNBits", kernels
    fp32 = result.report["verification"]["quantized_vs_fp32_sqnr_db"]["y"]
    assert fp32 >= 15.0, f"W4 g16 vs FP32 SQNR {fp32:.1f} dB: the transposed weight computes another product"
    w8 = onnxflex.quantize(model, calib, QuantConfig(method="rtn", verify_samples=16), progress=False)
    kept = next(n for n in w8.model.graph.node if n.op_type == "Gemm")
    assert any(a.name == "transB" and a.i for a in kept.attribute), "W8A8 runs keep the exported layout"


@pytest.mark.parametrize("changes, message", [
    (dict(group_size=32), "abits=0"),
    (dict(group_size=24, abits=0, wbits=4), "power of two"),
    (dict(group_size=8, abits=0, wbits=4), "power of two"),
    (dict(group_size=32, abits=0, wbits=8), "wbits 2-4"),
])
def test_bad_group_sizes_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**changes)


def test_a_group_size_that_does_not_divide_k_leaves_a_short_last_group():
    """K = 48 at groups of 32: steps [ceil(K/G), N], the last group short, as DequantizeLinear defines it
    (test_decoder.py's g128 runs, K = 64 and 192, check that onnxruntime fuses such weights)."""
    plan = build_plan(matmul_gemm_model(k=48), resolve(QuantConfig(abits=0, wbits=4, group_size=32)).plan)
    assert [(l.op_type, l.group_size) for l in plan.layers] == [("MatMul", 32), ("Gemm", 32)]
    with pytest.raises(ConfigError, match="layer_bits gives node"):
        build_plan(matmul_gemm_model(), resolve(QuantConfig(abits=0, wbits=4, group_size=16, layer_bits=(("*", 8),))).plan)
    calib = {"x": np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)}
    result = onnxflex.quantize(matmul_gemm_model(k=48), calib, QuantConfig(method="flexround", wbits=4, abits=0,
                               group_size=32, iters=20, batch_size=16, verify_samples=16), progress=False)
    g = result.model.graph
    inits = {t.name: t for t in g.initializer}
    nbits = next(n for n in g.node if n.op_type == "MatMulNBits")  # the MatMul before the Relu (emit/nbits.py)
    assert [list(inits[name].dims) for name in nbits.input[1:]] == [[16, 2, 16], [32], [16]]
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"]
    assert sim >= 60.0, f"onnxruntime vs simulation SQNR {sim:.1f} dB < 60 dB with a short last group"


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_a_short_last_group_gets_the_step_of_its_own_elements(method, asymmetric):
    """The zero padding of grouped_view leaves each step what the real elements alone give: the steps of
    K = 192 at G = 128 are those of rows 0-127 and of rows 128-191 quantized as groups of 64."""
    import torch

    from onnxflex.rounding.methods import make_rounder

    w = torch.randn(192, 24, generator=torch.Generator().manual_seed(0))
    whole = make_rounder(method, w, 1, 3, "mse", 128, asymmetric).export()
    first = make_rounder(method, w[:128], 1, 3, "mse", 128, asymmetric).export()
    last = make_rounder(method, w[128:], 1, 3, "mse", 64, asymmetric).export()
    assert whole.scale.shape == (2, 24) and whole.ints.shape == (192, 24)
    np.testing.assert_allclose(whole.scale, np.concatenate([first.scale, last.scale]), rtol=1e-6)
    np.testing.assert_array_equal(whole.zero_point, np.concatenate([first.zero_point, last.zero_point]))
    np.testing.assert_array_equal(whole.ints, np.concatenate([first.ints, last.ints]))


def test_blocked_weights_survive_a_checkpoint(tmp_path):
    """A resumed run restores blocked weights with their block size (checkpoint.py)."""
    import torch

    from onnxflex.checkpoint import Checkpoint
    from onnxflex.rounding.reconstruct import BlockResult
    from onnxflex.rounding.methods import make_rounder
    from onnxflex.rounding.rounders import FrozenRounder

    w = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    q = make_rounder("flexround", w, 1, 3, "mse", 16).export()
    folder = Checkpoint(tmp_path, {"model": "m", "config": "c", "calibration data": "d"})
    folder.save(0, "block0", BlockResult("block0", 1.0, 0.5, 10, 0.1), {"w": q}, {})
    restored = folder.load(0, "block0")["weights"]["w"]
    assert (restored.axis, restored.bits, restored.block_size) == (0, 3, 16)
    np.testing.assert_array_equal(FrozenRounder(restored).fake_quant().numpy(), q.dequantize())


def test_opset_conversion_sets_weight_payloads_aside_and_gives_the_same_model(monkeypatch):
    """Blocked weights raise the opset to 21 through onnx's version converter, which copies the whole
    model several times; the emitter hands it the graph without its large payloads and puts them back.
    The model is the same byte for byte as one converted with every payload in it."""
    from onnxflex import extdata
    from onnxflex.emit import qdq

    config = QuantConfig(method="rtn", wbits=4, abits=0, group_size=32, verify_samples=0, calib_samples=64)
    assert onnx.load(str(MODELS / "tiny_lm.onnx"), load_external_data=False).opset_import[0].version < 21
    held = []
    restored = qdq.with_payloads

    def spy(model, payloads):
        held.append(len(payloads))
        return restored(model, payloads)

    monkeypatch.setattr(extdata, "ASIDE_BYTES", 1 << 62)
    whole = onnxflex.quantize(str(MODELS / "tiny_lm.onnx"), str(MODELS / "tiny_lm.calib.npz"), config,
                              progress=False).model
    monkeypatch.setattr(extdata, "ASIDE_BYTES", 64)
    monkeypatch.setattr(qdq, "with_payloads", spy)
    light = onnxflex.quantize(str(MODELS / "tiny_lm.onnx"), str(MODELS / "tiny_lm.calib.npz"), config,
                              progress=False).model
    assert held and held[0] > 0, f"payloads set aside: {held}"
    assert light.opset_import[0].version == 21 or any(o.version == 21 for o in light.opset_import)
    assert light.SerializeToString() == whole.SerializeToString()
