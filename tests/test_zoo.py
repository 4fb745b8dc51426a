"""The zoo quantizes: every model of tests/zoo/*.json goes through ``onnxflex quantize`` at W8A8 (the
transformers also weight-only at 4 bits, groups of 32), as a user would run it, on calibration written
to an .npz from the manifest's feeds with the manifest's --fix-input/--batch-axis.

Each output passes onnx.checker (full), runs in onnxruntime on fresh feeds, ``onnxflex check --target
onnxruntime`` finds an integer kernel for every layer the report lists (inside If branches too), and
onnxruntime's outputs match onnxflex's torch simulation within the default 30 dB. The runs verify with
a tolerance of 0 so that the model and its report are written whatever the figure; the test asserts it
and prints it per model (``pytest -s``). Learned rounding runs 10 steps: the file is about the zoo's
graphs, not accuracy (bench/bench_zoo.py measures that).

The LSTMs of vad_stream and paddle_rec* are layers too: they must run as DynamicQuantizeLSTM. The GRUs
of vad_stream_gru and tf_text stay float by design (onnxruntime has no integer GRU; tests/test_recurrent.py
checks their warnings), so only the layers around them are checked. A block holding an If whose branches
have torch converters runs in torch, the taken branch included (the summary counts the blocks simulated
in torch).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnxflex.cli import main
from onnxflex.runtimes.base import WEIGHTED_OPS
from onnxflex.runtimes.onnxruntime import INTEGER_KERNELS
from zoo_models import ZooModel, zoo_models  # tests/ is on pytest's pythonpath

MODELS = {m.name: m for m in zoo_models()}
TRANSFORMERS = [name for name, m in MODELS.items() if m.transformer]
STREAMING = ["vad_stream", "vad_stream_gru"]
SAMPLES = 24  # 18 to calibrate, 6 held out; not 16, bert_tiny's sequence length (the batch axis would be ambiguous)
MIN_SIM_DB = 30.0  # quantize's default --verify-tolerance-db
FAST = ("--method", "flexround", "--iters", "10", "--batch-size", "8", "--verify-samples", "6",
        "--verify-tolerance-db", "0", "--device", "cpu", "--quiet")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def quantize(model: ZooModel, tmp_path, *flags, pin: bool = True) -> tuple[str, dict]:
    """Runs ``onnxflex quantize`` on ``model`` with the manifest's options (``pin``: its --fix-input too;
    without, the pinned inputs' shared values go into the .npz); returns (output path, report)."""
    pinned = model.fix_inputs if pin else {}
    calib = tmp_path / f"{model.name}.calib.npz"
    np.savez(calib, **{k: v for k, v in model.feeds(SAMPLES).items() if k not in pinned})
    out = tmp_path / f"{model.name}.q.onnx"
    args = ["quantize", model.path, "--calib", calib, "-o", out, *FAST, *flags]
    args += [a for k, v in pinned.items() for a in ("--fix-input", f"{k}={v:g}")]
    args += [a for k, v in model.batch_axes.items() for a in ("--batch-axis", f"{k}={v}")]
    result = invoke(*args)
    assert result.exit_code == 0, f"{model.name}: quantize exited {result.exit_code}: {result.output[-800:]}"
    return str(out), json.loads((tmp_path / f"{model.name}.q.onnx.report.json").read_text())


def check_kernels(path: str) -> dict[str, str]:
    """``onnxflex check --target onnxruntime --json``: layer name -> the kernel onnxruntime runs it as."""
    result = invoke("check", path, "--target", "onnxruntime", "--json")
    assert result.exit_code in (0, 1), result.output[-800:]
    return {layer["node"]: layer["kernel"] for layer in json.loads(result.stdout)["layers"]}


def sim_db(report: dict) -> tuple[str, float]:
    """(output, dB) of the lowest onnxruntime-vs-simulation SQNR over the model's outputs."""
    figures = report["verification"]["onnxruntime_vs_simulation_sqnr_db"]
    name = min(figures, key=lambda k: float(figures[k]))
    return name, float(figures[name])


def runs_on_fresh_feeds(model: ZooModel, path: str) -> None:
    onnx.checker.check_model(path, full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = model.feeds(3, seed=1)
    outputs = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    for meta, value in zip(session.get_outputs(), outputs):
        assert np.isfinite(value).all(), f"{model.name}: output {meta.name} has non-finite values"


def selected_layers(report: dict, ops=WEIGHTED_OPS) -> list[str]:
    return [layer["node"] for layer in report["layers"] if layer["op_type"] in ops]


@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_model_quantizes_w8a8_into_integer_kernels(name, tmp_path, record_property):
    model = MODELS[name]
    path, report = quantize(model, tmp_path)
    runs_on_fresh_feeds(model, path)
    kernels = check_kernels(path)
    layers = selected_layers(report, (*WEIGHTED_OPS, "LSTM"))
    assert layers, f"{name}: no layer was selected"
    lstms = [n.name for n in onnx.load(model.path).graph.node if n.op_type == "LSTM"]
    assert all(kernels.get(lstm) == "DynamicQuantizeLSTM" for lstm in lstms), (lstms, kernels)
    floating = {layer: kernels.get(layer, "not found") for layer in layers if kernels.get(layer) not in INTEGER_KERNELS}
    output, db = sim_db(report)
    record_property("ort_vs_sim_db", db)
    torch_blocks = sum(b["runtime"] == "torch" for b in report["blocks"])
    summary = (f"{name}: W8A8, {len(layers)} layers, {torch_blocks} of {len(report['blocks'])} blocks simulated "
               f"in torch, onnxruntime vs simulation {db:.1f} dB on {output}, kernels {sorted(set(kernels.values()))}")
    print(summary)
    assert not floating, f"{summary}; layers onnxruntime runs in float: {floating}"
    assert db >= MIN_SIM_DB, f"{summary}: below {MIN_SIM_DB} dB"


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_quantizes_weight_only_w4_g32_into_matmulnbits(name, tmp_path, record_property):
    model = MODELS[name]
    path, report = quantize(model, tmp_path, "--abits", "0", "--wbits", "4", "--group-size", "32")
    runs_on_fresh_feeds(model, path)
    kernels = check_kernels(path)
    # onnxruntime has no weight-only Conv kernel: ViT's patch embedding runs in float on int8 weights
    layers = selected_layers(report, ("MatMul", "Gemm"))
    grouped = [l["node"] for l in report["layers"] if l["group_size"] == 32]
    output, db = sim_db(report)
    record_property("ort_vs_sim_db", db)
    summary = f"{name}: W4 g32 weight-only, {len(layers)} MatMul/Gemm layers, onnxruntime vs simulation {db:.1f} dB"
    print(summary)
    assert layers and sorted(grouped) == sorted(layers), f"{summary}; layers in groups of 32: {grouped}"
    assert all(kernels.get(layer) == "MatMulNBits" for layer in layers), \
        f"{summary}; kernels {({layer: kernels.get(layer) for layer in layers})}"
    assert db >= MIN_SIM_DB, f"{summary}: below {MIN_SIM_DB} dB"


@pytest.mark.parametrize("name", STREAMING)
def test_streaming_model_quantizes_inside_the_if_it_takes(name, tmp_path):
    """sr not pinned: it goes into the calibration as a shared 0-d value, the If stays, and the
    16 kHz branch it takes runs as QLinearConv inside the If; the 8 kHz branch, never taken, keeps
    float activations (and int8 weights), so its layers are the only float ones. The block holding the
    If runs in torch (the taken branch's layers learned), so the simulation check covers them."""
    model = MODELS[name]
    path, report = quantize(model, tmp_path, pin=False)
    runs_on_fresh_feeds(model, path)
    (branch_if,) = [node for node in onnx.load(path).graph.node if node.op_type == "If"]
    branches = {attr.name: attr.g for attr in branch_if.attribute}
    taken = {n.name for n in branches["then_branch"].node if n.op_type == "Conv"}
    untaken = {n.name for n in branches["else_branch"].node if n.op_type == "Conv"}
    assert "QuantizeLinear" in [n.op_type for n in branches["then_branch"].node], f"{name}: no Q/DQ in then_branch"
    assert "QuantizeLinear" not in [n.op_type for n in branches["else_branch"].node], f"{name}: else_branch got Q/DQ"
    kernels = check_kernels(path)
    layers = selected_layers(report)
    assert taken | untaken <= set(layers), f"{name}: layers {layers}; branch Convs {sorted(taken | untaken)}"
    floating = {l for l in layers if kernels.get(l) not in INTEGER_KERNELS}
    assert len(taken) == 3 and all(kernels[l] == "QLinearConv" for l in taken), f"{name}: kernels {kernels}"
    assert floating == untaken, f"{name}: float layers {sorted(floating)}, never-taken branch {sorted(untaken)}"
    in_onnxruntime = [b["name"] for b in report["blocks"] if b["runtime"] != "torch"]
    assert not in_onnxruntime, f"{name}: {in_onnxruntime} run in onnxruntime; the If's block should run in torch"
    never = [w for w in report["warnings"] if f"{branch_if.name!r}: else_branch never ran" in w]
    assert len(never) == 1 and all(c in never[0] for c in untaken), report["warnings"]  # --quiet run: still kept
    output, db = sim_db(report)
    print(f"{name}: If kept, {len(layers) - len(floating)} integer layers ({len(taken)} inside the If), "
          f"{len(report['blocks'])} block(s) simulated in torch, onnxruntime vs simulation {db:.1f} dB on {output}")
    assert db >= MIN_SIM_DB, f"{name}: onnxruntime vs simulation {db:.1f} dB on {output}"


def test_gpt2_position_ids_are_per_sample():
    """The arange kind: each sample holds its own positions after the 4 past tokens, so a calibration
    set has them on the batch axis like every other input (a shared [1, 4] array had none)."""
    model = MODELS["gpt2_tiny_past"]
    feeds = model.feeds(5)
    assert feeds["position_ids"].shape == (5, 4) and feeds["position_ids"].dtype == np.int64
    assert (feeds["position_ids"] == np.arange(4, 8)).all(), feeds["position_ids"]
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    batched = session.run(["logits"], feeds)[0]
    one = session.run(["logits"], {k: v[2:3] for k, v in feeds.items()})[0]
    np.testing.assert_allclose(batched[2:3], one, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_model_compared_with_itself_is_infinite_sqnr(name, tmp_path):
    """`onnxflex compare` takes every zoo model's inputs (0-d, shared, integer, batch on axis 1; the
    manifest's --batch-axis where the data alone cannot tell, its --fix-input for an input the data
    leaves out) and its intermediate tensors (0-d shape arithmetic, -inf masks, bool masks, recurrent
    state)."""
    model = MODELS[name]
    data = tmp_path / f"{name}.eval.npz"
    feeds = model.feeds(6, seed=2)  # 6: no zoo model has a dim of 6 to confuse with the samples
    np.savez(data, **{k: v for k, v in feeds.items() if k not in model.fix_inputs})
    axes = [a for k, v in model.batch_axes.items() for a in ("--batch-axis", f"{k}={v}")]
    axes += [a for k, v in model.fix_inputs.items() for a in ("--fix-input", f"{k}={v:g}")]
    result = invoke("compare", model.path, model.path, "--data", data, "--repeats", "2", "--latency-seconds", "0",
                    "--json", *axes)
    assert result.exit_code == 0, f"{name}: compare exited {result.exit_code}: {result.output[-800:]}"
    outputs = json.loads(result.stdout)["outputs"]
    assert outputs and all(o["sqnr_db"] == "inf" for o in outputs), outputs
