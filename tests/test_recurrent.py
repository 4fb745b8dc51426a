"""Recurrent layers: LSTM emitted as com.microsoft DynamicQuantizeLSTM and simulated as that kernel runs,
GRU kept float with a warning, no Q/DQ on the recurrent state, and the streaming VAD of the zoo keeping
its fidelity over a long stream of calls with the state fed back."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from helpers import run_model
from onnxflex.check import check, format_report
from onnxflex.options import resolve
from onnxflex.passes.recurrent import recurrent_layers
from onnxflex.qparams import sqnr_db
from onnxflex.rounding.converters import OpNode, find_converter
from onnxflex.rounding.converters.recurrent import QUANTIZED
from onnxflex.runtimes.targets import get_target
from onnxflex.verify import optimized_op_counts
from zoo_models import zoo_models

H, K, T = 16, 12, 5
CALIB = 48
STREAM_CALLS = 120
STREAMS = 32


def _rnn_model(op: str = "LSTM", seed: int = 0, *, direction: str = "forward", layout: int = 0,
               state_gemm: bool = False, peepholes: bool = False) -> onnx.ModelProto:
    """x [T, N, K] → Gemm-free recurrent layer with initial state from the graph input ``state`` [D, N, H]
    (and ``cell`` for LSTM); outputs y, and the final state(s) as graph outputs, as a streaming export
    writes them. ``state_gemm``: a Gemm also reads the squeezed state, so that the state is a weighted
    layer's input. layout=1 swaps T and N everywhere."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    gates = 4 if op == "LSTM" else 3
    inits = [numpy_helper.from_array((rng.standard_normal((dirs, gates * H, K)) * 0.3).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((dirs, gates * H, H)) * 0.3).astype(np.float32), "R"),
             numpy_helper.from_array((rng.standard_normal((dirs, 2 * gates * H)) * 0.1).astype(np.float32), "B")]
    seq, batch = ("N", T) if layout else (T, "N")
    state_shape = ["N", dirs, H] if layout else [dirs, "N", H]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, batch, K]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, state_shape)]
    rnn_inputs = ["x", "W", "R", "B", "", "state"]
    outputs = ["y", "state_out"]
    if op == "LSTM":
        inputs.append(helper.make_tensor_value_info("cell", TensorProto.FLOAT, state_shape))
        rnn_inputs.append("cell")
        outputs.append("cell_out")
        if peepholes:
            inits.append(numpy_helper.from_array((rng.standard_normal((dirs, 3 * H)) * 0.1).astype(np.float32), "P"))
            rnn_inputs.append("P")
    attrs = {"hidden_size": H, "direction": direction}
    if layout:
        attrs["layout"] = 1
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    nodes = [helper.make_node(op, rnn_inputs, outputs, name="rnn", **attrs)]
    y_shape = ["N", T, dirs, H] if layout else [T, dirs, "N", H]
    graph_outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, y_shape if o == "y" else state_shape)
                     for o in outputs]
    if state_gemm:
        inits += [numpy_helper.from_array(np.array([0], np.int64), "axis0"),
                  numpy_helper.from_array((rng.standard_normal((H, 4)) * 0.3).astype(np.float32), "Wp")]
        nodes += [helper.make_node("Squeeze", ["state", "axis0"], ["h_in"], name="squeeze_state"),
                  helper.make_node("Gemm", ["h_in", "Wp"], ["proj"], name="state_proj")]
        graph_outputs.append(helper.make_tensor_value_info("proj", TensorProto.FLOAT, ["N", 4]))
    graph = helper.make_graph(nodes, f"{op.lower()}_stream", inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(model: onnx.ModelProto, n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        dims = [n if d.dim_param == "N" else d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = (rng.standard_normal(dims) * (1.0 if vi.name == "x" else 0.3)).astype(np.float32)
    return out


def _quantize(model, feeds, **config):
    """RTN; the samples on axis 1 of x, state and cell (every input's axis 0 is fixed, so say so)."""
    axes = tuple(f"{vi.name}=1" for vi in model.graph.input)
    return onnxflex.quantize(model, feeds, onnxflex.QuantConfig(method="rtn", batch_axes=axes, **config),
                             progress=False)


def _nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


# --- converters ------------------------------------------------------------------------------------


def _convert(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    node = OpNode.from_proto(model.graph.node[0], 17)
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    inputs = [inits.get(n, torch.from_numpy(feeds[n]) if n in feeds else None) if n else None for n in node.inputs]
    return [v.numpy() for v in find_converter(node.op_type, 17)(node, inputs)]


@pytest.mark.parametrize("op,direction,peepholes", [
    ("LSTM", "forward", False), ("LSTM", "bidirectional", True), ("LSTM", "reverse", False),
    ("GRU", "forward", False), ("GRU", "bidirectional", False)])
def test_converter_matches_onnxruntime(op, direction, peepholes):
    model = _rnn_model(op, direction=direction, peepholes=peepholes)
    feeds = _feeds(model, 3)
    for name, want, got in zip(["Y", "Y_h", "Y_c"], run_model(model, feeds), _convert(model, feeds)):
        db = sqnr_db(want, got)
        assert db >= 80.0, f"{op} {direction} output {name}: torch vs onnxruntime {db:.1f} dB"


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_converter_layout1_is_layout0_transposed(op):
    """onnxruntime refuses layout=1; the converter computes the same values batch-major."""
    seq_major = _rnn_model(op, direction="bidirectional")
    feeds = _feeds(seq_major, 3)
    batch_major = {k: np.ascontiguousarray(v.swapaxes(0, 1)) for k, v in feeds.items()}
    want = _convert(seq_major, feeds)
    got = _convert(_rnn_model(op, direction="bidirectional", layout=1), batch_major)
    np.testing.assert_allclose(got[0], want[0].transpose(2, 0, 1, 3), atol=1e-6)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w.swapaxes(0, 1), atol=1e-6)


# --- LSTM as DynamicQuantizeLSTM -------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_lstm_emitted_as_dynamic_quantize_lstm_matches_simulation(direction):
    model = _rnn_model("LSTM", direction=direction, peepholes=direction == "forward")
    result = _quantize(model, _feeds(model, CALIB))
    fused = _nodes(result.model, "DynamicQuantizeLSTM")
    assert len(fused) == 1 and fused[0].domain == "com.microsoft" and not _nodes(result.model, "LSTM")
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    dirs = 2 if direction == "bidirectional" else 1
    w, r = inits[fused[0].input[1]], inits[fused[0].input[2]]
    assert w.dtype == np.int8 and w.shape == (dirs, K, 4 * H), f"W {w.dtype} {w.shape}"
    assert r.dtype == np.int8 and r.shape == (dirs, H, 4 * H), f"R {r.dtype} {r.shape}"
    for k in (8, 10):
        assert inits[fused[0].input[k]].shape == (dirs, 4 * H)  # one step per gate row
    for k in (9, 11):
        assert not inits[fused[0].input[k]].any()  # symmetric
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]
    print(f"LSTM {direction}: onnxruntime vs simulation {sim}")
    assert min(sim.values()) >= 30.0, f"DynamicQuantizeLSTM vs simulation {sim} < 30 dB"
    fp = result.report["verification"]["quantized_vs_fp32_sqnr_db"]
    assert min(fp.values()) >= 25.0, f"quantized LSTM vs FP32 {fp}"
    assert optimized_op_counts(result.model).get("DynamicQuantizeLSTM") == 1
    report = check(result.model)
    assert report.ok and any(l.node == "rnn" and l.kernel == "DynamicQuantizeLSTM" for l in report.layers), \
        [f.message for f in report.findings]


@pytest.mark.parametrize("threads,floor", [(1, 80.0), (0, 30.0)])
def test_dynamic_quantize_lstm_kernel_is_what_the_converter_computes(threads, floor):
    """The emitted DynamicQuantizeLSTM in onnxruntime against converters.recurrent.dynamic_quantize_lstm
    on the exported integers: the same arithmetic on one thread (where onnxruntime quantizes the whole
    batch's hidden state at once), one uint8 step apart where it splits the batch over threads."""
    import onnxruntime as ort

    model = _rnn_model("LSTM", direction="bidirectional")
    result = _quantize(model, _feeds(model, CALIB))
    feeds = _feeds(model, 16, seed=5)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(result.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    want = sess.run(["y", "state_out", "cell_out"], feeds)
    node = OpNode.from_proto(model.graph.node[0], 17)
    weights = {k: torch.from_numpy(result.params.weights[k].dequantize()) for k in ("W", "R")}
    bias = torch.from_numpy(numpy_helper.to_array(model.graph.initializer[2]).copy())
    inputs = [torch.from_numpy(feeds["x"]), weights["W"], weights["R"], bias, None,
              torch.from_numpy(feeds["state"]), torch.from_numpy(feeds["cell"])]
    got = QUANTIZED["LSTM"](node, inputs)
    dbs = {name: sqnr_db(w, g.numpy()) for name, w, g in zip(("Y", "Y_h", "Y_c"), want, got)}
    print(f"DynamicQuantizeLSTM ({threads or 'default'} threads) vs simulation: "
          + ", ".join(f"{k} {v:.1f} dB" for k, v in dbs.items()))
    assert min(dbs.values()) >= floor, f"onnxruntime vs simulation {dbs} < {floor} dB"


def test_lstm_clip_runs_in_onnxruntime():
    """The converter refuses an LSTM's clip (the block then runs in onnxruntime, still emitted as
    DynamicQuantizeLSTM)."""
    node = OpNode.from_proto(helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="clipped", hidden_size=H,
                                              clip=2.0), 17)
    x, w, r = torch.zeros(T, 2, K), torch.zeros(1, 4 * H, K), torch.zeros(1, 4 * H, H)
    with pytest.raises(NotImplementedError, match="clip"):
        find_converter("LSTM", 17)(node, [x, w, r])


def test_lstm_stays_float_where_dynamic_quantize_lstm_cannot_express_it(caplog):
    """layout=1 has no DynamicQuantizeLSTM form (onnxruntime runs no batch-major LSTM at all), and a
    weight-only run (--abits 0) must not quantize activations: one warning naming the node each."""
    layers, warnings = recurrent_layers(_rnn_model("LSTM", layout=1), get_target("onnxruntime"),
                                        resolve(onnxflex.QuantConfig()).plan)
    assert not layers and len(warnings) == 1 and "'rnn'" in warnings[0] and "layout=1" in warnings[0], warnings
    model = _with_output_gemm(_rnn_model("LSTM"))
    with caplog.at_level(logging.WARNING, logger="onnxflex"):
        result = _quantize(model, _feeds(model, CALIB), abits=0)
    lines = [w for w in result.report["warnings"] if "'rnn' (LSTM)" in w]
    assert len(lines) == 1 and "--abits 0" in lines[0], result.report["warnings"]
    assert any("'rnn' (LSTM)" in r.message for r in caplog.records)
    assert _nodes(result.model, "LSTM") and not _nodes(result.model, "DynamicQuantizeLSTM")


def _with_output_gemm(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (one direction) with a MatMul head on its final hidden state, so that a layer is quantizable."""
    rng = np.random.default_rng(3)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    layout = any(a.name == "layout" and a.i for a in m.graph.node[0].attribute)
    m.graph.initializer.extend([numpy_helper.from_array(np.array([1 if layout else 0], np.int64), "dir_axis"),
                                numpy_helper.from_array((rng.standard_normal((H, 4)) * 0.3).astype(np.float32), "Wo")])
    m.graph.node.extend([helper.make_node("Squeeze", ["state_out", "dir_axis"], ["last"], name="last_h"),
                         helper.make_node("MatMul", ["last", "Wo"], ["logits"], name="head")])
    m.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]))
    return m


def test_gru_stays_float_with_a_warning_per_layer(caplog):
    model = _with_output_gemm(_rnn_model("GRU"))
    with caplog.at_level(logging.WARNING, logger="onnxflex"):
        result = _quantize(model, _feeds(model, CALIB))
    lines = [w for w in result.report["warnings"] if "'rnn' (GRU)" in w]
    assert len(lines) == 1 and "no integer GRU kernel" in lines[0], result.report["warnings"]
    assert any("'rnn' (GRU)" in r.message for r in caplog.records), "the GRU warning is not in the log"
    gru = _nodes(result.model, "GRU")[0]
    inits = {t.name: t for t in result.model.graph.initializer}
    assert all(inits[gru.input[k]].data_type == TensorProto.FLOAT for k in (1, 2)), "GRU weights are not float"
    findings = [f for f in check(result.model).findings if f.node == "rnn"]
    assert findings and not any(f.fallback for f in findings), findings


# --- recurrent state -------------------------------------------------------------------------------


def _qdq_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors read by a QuantizeLinear or written by an activation DequantizeLinear."""
    inits = {t.name for t in model.graph.initializer}
    read = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    written = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits}
    return read | written


def test_state_tensors_get_no_qdq():
    """A Gemm reads the state input (it would be an activation quant point); the state still stays float,
    the Gemm keeps its int8 weight, and the state outputs are untouched."""
    model = _rnn_model("LSTM", state_gemm=True)
    result = _quantize(model, _feeds(model, CALIB))
    touched = _qdq_tensors(result.model)
    state_path = {"state", "cell", "h_in", "state_out", "cell_out"}
    assert not touched & state_path, f"Q/DQ on state tensors {touched & state_path}"
    gemm = _nodes(result.model, "Gemm")[0]
    assert any(n.op_type == "DequantizeLinear" and n.output[0] == gemm.input[1] for n in result.model.graph.node)
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert producers["state_out"] == producers["cell_out"] == "DynamicQuantizeLSTM"


# --- the streaming VAD of the zoo ------------------------------------------------------------------


def _zoo(name: str):
    return next(m for m in zoo_models() if m.name == name)


def _stream(model: onnx.ModelProto, chunks: np.ndarray, reference_states=None):
    """Run ``model`` call after call on ``chunks`` [calls, N, 576] with the state fed back (or, with
    ``reference_states``, each call from the given state); returns (outputs [calls, N, 1], states in)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1  # DynamicQuantizeLSTM's run-time ranges depend on how it splits the batch
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    state = np.zeros((2, chunks.shape[1], 128), np.float32)
    outputs, states = [], []
    for k, chunk in enumerate(chunks):
        if reference_states is not None:
            state = reference_states[k]
        states.append(state)
        out, state = sess.run(["output", "stateN"], {"input": chunk, "state": state, "sr": np.array(16000)})
        outputs.append(out)
    return np.stack(outputs), states


def _audio_chunks(seed: int, streams: int, calls: int) -> np.ndarray:
    """[calls, streams, 576] chunks (512 new samples + 64 of context) of gated tones in noise at 16 kHz."""
    t = np.arange(calls * 512, dtype=np.float32) / 16000.0
    rng = np.random.default_rng(seed)
    tone = np.sin(2 * np.pi * np.outer(rng.uniform(100, 900, streams), t)) * (np.sin(2 * np.pi * 0.7 * t) > 0)
    audio = np.pad(0.1 * tone + 0.02 * rng.standard_normal(tone.shape), ((0, 0), (64, 0))).astype(np.float32)
    return np.stack([audio[:, k * 512:k * 512 + 576] for k in range(calls)])


def test_vad_lstm_stream_keeps_single_call_fidelity():
    """The LSTM VAD, calibrated as a streaming model should be (chunks with the states the FP32 model
    reaches on them), quantizes with its LSTM as DynamicQuantizeLSTM and no Q/DQ on the state. Over a
    stream of 120 calls with the state fed back, its output fidelity against the FP32 model streamed
    alike stays within 1 dB of the single-call fidelity (each call from the FP32 model's own state),
    over the whole stream and over calls 100-120; so does the state's own SQNR against the state after
    the first call: rounding does not compound step after step."""
    zoo = _zoo("vad_stream")
    fp32 = onnx.load(zoo.path)
    calib = _audio_chunks(11, 4, CALIB // 4)
    _, states = _stream(fp32, calib)
    feeds = {"input": calib.reshape(-1, 576), "state": np.concatenate(states, axis=1), "sr": np.array(16000)}
    # step_budget 0: every block runs fast's iterations (under the budget the margin is 1.1 dB, not 1.0)
    config = onnxflex.QuantConfig(preset="fast", step_budget=0, fix_inputs=tuple(f"{k}={v}" for k, v in zoo.fix_inputs.items()))
    result = onnxflex.quantize(fp32, feeds, config, progress=False)
    assert _nodes(result.model, "DynamicQuantizeLSTM"), "the LSTM was not quantized"
    assert "DynamicQuantizeLSTM" in {l.kernel for l in check(result.model).layers}
    assert not _qdq_tensors(result.model) & {"state", "stateN"}
    chunks = _audio_chunks(7, STREAMS, STREAM_CALLS)
    fp_out, fp_states = _stream(fp32, chunks)
    q_streamed, q_states = _stream(result.model, chunks)
    q_single, _ = _stream(result.model, chunks, reference_states=fp_states)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731  (the probabilities sit near 0.5)
    rows = {}
    for name, f in (("output", lambda p: p), ("output logit", logit)):
        rows[name] = (sqnr_db(f(fp_out), f(q_single)), sqnr_db(f(fp_out), f(q_streamed)),
                      sqnr_db(f(fp_out[100:]), f(q_streamed[100:])))
    fp_s, q_s = np.stack(fp_states), np.stack(q_states)
    rows["state"] = (sqnr_db(fp_s[1], q_s[1]), sqnr_db(fp_s[1:], q_s[1:]), sqnr_db(fp_s[101:], q_s[101:]))
    for name, (single, streamed, late) in rows.items():
        print(f"vad_stream W8A8 {name}: single call {single:.1f} dB, {STREAM_CALLS}-call stream {streamed:.1f} dB, "
              f"calls 100-{STREAM_CALLS} {late:.1f} dB")
    for name, (single, streamed, late) in rows.items():
        assert min(streamed, late) >= single - 1.0, \
            f"{name}: streamed {streamed:.1f} / calls 100+ {late:.1f} dB < single call {single:.1f} dB - 1 dB"


@pytest.mark.parametrize("name", ["vad_stream_gru", "tf_text"])
def test_zoo_gru_models_quantize_around_float_grus(name):
    """The zoo's GRU models (a torch streaming VAD with two GRU layers, a tf2onnx text classifier):
    every GRU stays float with its own warning, the layers around them run as integer kernels, and
    onnxruntime agrees with the simulation."""
    zoo = _zoo(name)
    fp32 = onnx.load(zoo.path)
    grus = [n.name for n in fp32.graph.node if n.op_type == "GRU"]
    config = onnxflex.QuantConfig(method="rtn", fix_inputs=tuple(f"{k}={v}" for k, v in zoo.fix_inputs.items()))
    result = onnxflex.quantize(fp32, zoo.feeds(CALIB), config, progress=False)
    for gru in grus:
        assert sum(f"{gru!r} (GRU)" in w for w in result.report["warnings"]) == 1, result.report["warnings"]
    assert len(_nodes(result.model, "GRU")) == len(grus)
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]
    print(f"{name}: onnxruntime vs simulation {sim}, vs FP32 {result.report['verification']['quantized_vs_fp32_sqnr_db']}")
    assert min(sim.values()) >= 30.0, sim
    report = check(result.model)
    assert report.ok and report.layers and all(l.integer for l in report.layers), format_report(report)
