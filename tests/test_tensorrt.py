"""Issue 4: the tensorrt target (symmetric int8, TensorRT placement), models emitted for each target pass
`onnxflex check` for that target, the accuracy of symmetric activations on the bundled CNN, and the
device choice (CUDA path) without a GPU."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import graphs  # tests/graphs.py
import onnxflex
from helpers import CNN, run_model, top1
from onnxflex.check import FLOAT_KERNELS, check, format_report
from onnxflex.config import QuantConfig
from onnxflex.errors import DeviceError
from onnxflex.qparams import sqnr_db
from onnxflex.runtimes.targets import get_target

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def transformer_block(seed: int = 0, tokens: int = 8, dim: int = 16) -> onnx.ModelProto:
    """Pre-LayerNorm attention + GELU (Erf) MLP with two residual Adds, then a Gemm head; opset 17."""
    b = graphs._Builder(seed)
    ones, zeros = np.ones(dim, np.float32), np.zeros(dim, np.float32)

    def layer_norm(x, name):
        return b.node("LayerNormalization", [x, b.const(f"{name}_g", ones), b.const(f"{name}_b", zeros)], [name],
                      axis=-1)

    h = layer_norm("x", "ln1")
    q, k, v = (b.node("MatMul", [h, b.he(f"w{n}", (dim, dim), dim)], [n]) for n in "qkv")
    kt = b.node("Transpose", [k], ["kt"], perm=[0, 2, 1])
    scores = b.node("Mul", [b.node("MatMul", [q, kt], ["qk"]), b.const("inv_sqrt_d", np.float32(dim ** -0.5))],
                    ["scores"])
    attn = b.node("MatMul", [b.node("Softmax", [scores], ["probs"], axis=-1), v], ["attn"])
    r1 = b.node("Add", ["x", b.node("MatMul", [attn, b.he("wo", (dim, dim), dim)], ["proj"])], ["r1"])
    up = b.node("Add", [b.node("MatMul", [layer_norm(r1, "ln2"), b.he("w1", (dim, 2 * dim), dim)], ["up"]),
                        b.small("b1", (2 * dim,))], ["up_b"])
    erf = b.node("Erf", [b.node("Mul", [up, b.const("inv_sqrt2", np.float32(2 ** -0.5))], ["up_s"])], ["erf"])
    gate = b.node("Add", [erf, b.const("one", np.float32(1.0))], ["erf1"])
    gelu = b.node("Mul", [b.node("Mul", [up, gate], ["g0"]), b.const("half", np.float32(0.5))], ["gelu"])
    r2 = b.node("Add", [r1, b.node("MatMul", [gelu, b.he("w2", (2 * dim, dim), 2 * dim)], ["down"])], ["r2"])
    flat = b.node("Flatten", [r2], ["flat"], axis=1)
    b.node("Gemm", [flat, b.he("wh", (10, tokens * dim), tokens * dim), b.small("bh", (10,))], ["y"], transB=1)
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", tokens, dim])
    return b.model("transformer_block", [x], [graphs._out("N", 10)], opset=17)


def small_config(target: str, **changes) -> QuantConfig:
    return QuantConfig(target=target, method="flexround", iters=30, batch_size=16, **changes)


@pytest.fixture(scope="module")
def emitted():
    """target → {model name: QuantResult} for the CNN, a transformer block and a few foreign graphs."""
    models = {"transformer_block": transformer_block()}
    models.update({name: graphs.BUILDERS[name](0) for name in ("conv_batchnorm", "shared_weights", "gemm_mlp")})
    out = {}
    for target in ("tensorrt", "onnxruntime"):
        out[target] = {name: onnxflex.quantize(m, graphs.random_calibration(m, 96, 1), small_config(target),
                                               progress=False) for name, m in models.items()}
    return out


def test_target_rules_are_data():
    trt, ort = get_target("tensorrt"), get_target("onnxruntime")
    assert trt.act_dtype == TensorProto.INT8 and trt.act_symmetric and trt.symmetric_only
    assert not trt.int32_bias and not trt.quantize_outputs and trt.quantize_residual_add
    assert trt.shared_concat_scales and trt.min_opset <= 13 <= trt.max_opset
    assert ort.act_dtype == TensorProto.UINT8 and ort.int32_bias and ort.quantize_outputs
    assert not ort.quantize_residual_add


def test_tensorrt_cnn_placement_and_encoding(quantized_cnn):
    result = quantized_cnn(method="rtn", target="tensorrt")
    g = result.model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    for node in (n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")):
        zp = inits[node.input[2]]
        assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any(), node.name
    for node in (n for n in g.node if n.op_type in WEIGHTED):
        assert producer[node.input[0]].op_type == "DequantizeLinear", f"{node.name}: input not quantized"
        assert node.input[2] in inits and inits[node.input[2]].data_type == TensorProto.FLOAT, \
            f"{node.name}: the bias must stay a float initializer"
    adds = [n for n in g.node if n.op_type == "Add"]
    assert len(adds) == 3 and all(any(producer[i].op_type == "DequantizeLinear" for i in a.input) for a in adds)
    conv_outputs_quantized = [n.name for n in g.node if n.op_type in WEIGHTED
                              and any(u.op_type == "QuantizeLinear" for u in users.get(n.output[0], []))]
    assert conv_outputs_quantized == ["/stage2/stage2.0/skip/skip.0/Conv"], \
        f"only the projection conv that is a residual Add's skip input has a Q on its output: {conv_outputs_quantized}"
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["logits"]
    assert sim >= 30.0, f"onnxruntime vs torch simulation {sim:.1f} dB < 30 dB for the tensorrt target"


@pytest.mark.parametrize("name", ["transformer_block", "conv_batchnorm", "shared_weights", "gemm_mlp"])
def test_tensorrt_emitted_models_pass_the_tensorrt_check(emitted, name):
    result = emitted["tensorrt"][name]
    report = check(result.model, "tensorrt")
    assert report.ok and report.layers and all(l.integer for l in report.layers), format_report(report)
    sim = result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]
    assert min(sim.values()) >= 30.0, f"{name}: onnxruntime vs simulation {sim}"
    fp32 = min(result.report["verification"]["quantized_vs_fp32_sqnr_db"].values())
    print(f"{name} tensorrt W8A8: {fp32:.1f} dB vs FP32, {len(report.layers)} integer layers")
    assert fp32 >= 20.0, f"{name} tensorrt W8A8 output SQNR {fp32:.1f} dB < 20 dB"


@pytest.mark.parametrize("name", ["transformer_block", "conv_batchnorm", "shared_weights", "gemm_mlp"])
def test_onnxruntime_emitted_models_pass_the_onnxruntime_check(emitted, name):
    report = check(emitted["onnxruntime"][name].model, "onnxruntime")
    assert report.ok, format_report(report)
    left = {k: v for k, v in report.runtime_ops.items() if k in FLOAT_KERNELS}
    by_design = {f.node for f in report.findings if f.rule == "latency-float"}  # shallow layers kept float
    float_layers = [l.node for l in report.layers if l.kernel in FLOAT_KERNELS and l.node not in by_design]
    assert not float_layers, f"{name}: float kernels left in onnxruntime's optimized graph: {left}"


def test_transformer_check_ignores_activation_matmuls(emitted):
    report = check(emitted["tensorrt"]["transformer_block"].model, "tensorrt")
    ops = sorted(l.op_type for l in report.layers)
    assert ops == ["Gemm"] + ["MatMul"] * 6, f"weighted layers seen by the check: {ops}"


def test_cnn_emitted_for_each_target_passes_its_check(quantized_cnn):
    trt = check(quantized_cnn(method="rtn", target="tensorrt").model, "tensorrt")
    assert trt.ok and len(trt.layers) == 9, format_report(trt)
    ort = check(quantized_cnn(method="rtn", wbits=8, abits=8).model, "onnxruntime")
    assert ort.ok, format_report(ort)
    assert {l.kernel for l in ort.layers if l.integer} == {"QLinearConv", "QGemm"}, ort.layers
    assert {l.node for l in ort.layers if not l.integer} == {"/stem/stem.0/stem.0.0/Conv",
                                                             "/stage2/stage2.0/skip/skip.0/Conv"}, ort.layers
    crossed = check(quantized_cnn(method="rtn", wbits=8, abits=8).model, "tensorrt", runtime=False)
    assert not crossed.ok and {f.rule for f in crossed.fallbacks} >= {"act-dtype", "bias"}


def test_tensorrt_symmetric_accuracy_on_the_bundled_cnn(quantized_cnn, cnn_eval, cnn_fp32_logits):
    """tensorrt-target W8A8 FlexRound within 1 point of FP32; the symmetric min/max RTN baseline measured
    beside it (the issue expects it to fall further behind; the numbers are printed either way)."""
    labels = cnn_eval["labels"]
    fp32 = top1(cnn_fp32_logits, labels)
    rows = {}
    for name, options in {"flexround": dict(), "rtn-minmax": dict(method="rtn", act_scale="minmax",
                                                                   weight_scale="minmax")}.items():
        result = quantized_cnn(target="tensorrt", **options)
        logits = run_model(result.model, {"input": cnn_eval["input"]})[0]
        rows[name] = (top1(logits, labels), sqnr_db(cnn_fp32_logits, logits))
    print(f"digits CNN top-1: FP32 {fp32:.2f}%; tensorrt W8A8 " +
          "; ".join(f"{k} {t:.2f}% ({db:.1f} dB)" for k, (t, db) in rows.items()))
    flex_top1, flex_db = rows["flexround"]
    assert flex_top1 >= fp32 - 1.0, f"tensorrt W8A8 FlexRound top-1 {flex_top1:.2f}% vs FP32 {fp32:.2f}%"
    assert flex_db >= rows["rtn-minmax"][1], \
        f"FlexRound {flex_db:.1f} dB below symmetric min/max RTN {rows['rtn-minmax'][1]:.1f} dB"


def test_device_cuda_without_cuda_is_a_clear_error(monkeypatch):
    from onnxflex import device

    monkeypatch.setattr(device, "cuda_available", lambda: (False, "torch sees no CUDA device"))
    with pytest.raises(DeviceError, match="--device cuda was asked for but torch sees no CUDA device"):
        device.resolve_device("cuda")


def test_device_cuda_on_the_cli_exits_2_without_cuda(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from onnxflex import device
    from onnxflex.cli import main

    monkeypatch.setattr(device, "cuda_available", lambda: (False, "torch sees no CUDA device"))
    out = CliRunner().invoke(main, ["quantize", str(CNN), "-o", str(tmp_path / "q.onnx"), "--device", "cuda",
                                    "--iters", "0", "--quiet"])
    assert out.exit_code == 2, out.output
    assert "--device cuda" in out.output and "--device cpu" in out.output, out.output
    assert not (tmp_path / "q.onnx").exists()


def test_device_auto_falls_back_to_cpu_with_one_line(monkeypatch, caplog):
    from onnxflex import device

    monkeypatch.setattr(device, "cuda_available", lambda: (False, "torch sees no CUDA device"))
    with caplog.at_level("INFO", logger="onnxflex"):
        chosen = device.resolve_device("auto")
    assert chosen.torch_device == "cpu" and chosen.providers == ("CPUExecutionProvider",)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["no usable CUDA device (torch sees no CUDA device); running on CPU"], lines


def test_device_auto_picks_cuda_when_usable(monkeypatch):
    from onnxflex import device

    monkeypatch.setattr(device, "cuda_available", lambda: (True, ""))
    chosen = device.resolve_device("auto")
    assert chosen.torch_device == "cuda" and chosen.providers[0] == "CUDAExecutionProvider"


@pytest.mark.gpu
def test_cuda_tensorrt_target_and_engine_check():
    """On a GPU: capture with CUDA, reconstruct on the GPU, and (where TensorRT is installed) build an
    engine whose convolutions run in int8."""
    result = onnxflex.quantize(CNN, config=QuantConfig(device="cuda", target="tensorrt", iters=20), progress=False)
    assert result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["logits"] >= 30
    report = check(result.model, "tensorrt")
    assert report.ok, format_report(report)
    if not report.not_verified:
        assert all("int8" in l.kernel for l in report.layers if l.op_type == "Conv"), report.layers


def two_branch_concat(seed: int = 0) -> onnx.ModelProto:
    """Two Conv+Relu branches whose outputs feed their own Convs and one Concat → Conv (inception-like)."""
    b = graphs._Builder(seed)
    for name in ("a", "b"):
        conv = b.node("Conv", ["x", b.conv_weight(f"w_{name}", 8, 3, 3), b.small(f"b_{name}", (8,))],
                      [f"{name}_c"], pads=[1, 1, 1, 1])
        b.node("Relu", [conv], [name])
        b.node("Conv", [name, b.conv_weight(f"w_{name}2", 8, 8, 1)], [f"{name}2"])
    b.node("Concat", ["a", "b"], ["ab"], axis=1)
    b.node("Conv", ["ab", b.conv_weight("w_ab", 8, 16, 1)], ["e"])
    b.node("Concat", ["a2", "b2", "e"], ["y"], axis=1)
    return b.model("two_branch_concat", [graphs._image()], [graphs._out("N", 24, 16, 16)], opset=13)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_concat_inputs_share_one_step_only_where_the_target_needs_it(target):
    model = two_branch_concat()
    result = onnxflex.quantize(model, graphs.random_calibration(model, 96, 2), small_config(target), progress=False)
    acts = result.params.acts
    assert {"a", "b"} <= set(acts), sorted(acts)
    shared = acts["a"].scale == acts["b"].scale
    assert shared == get_target(target).shared_concat_scales, f"{target}: steps {acts['a']} {acts['b']}"
    sim = min(result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"].values())
    assert sim >= 30.0, f"{target}: onnxruntime vs simulation {sim:.1f} dB"
    report = check(result.model, target)
    assert report.ok, format_report(report)


def fake_tensorrt(layers: list[dict]):
    """A stand-in for the tensorrt module, exercising onnxflex's engine-check code without a GPU. It
    mimics only the calls onnxflex makes; the layer records follow the engine inspector's JSON."""
    import json
    import types

    ns = types.SimpleNamespace
    network = ns(num_inputs=1, get_input=lambda i: ns(name="input", shape=(-1, 1, 16, 16)))
    profile = ns(shapes={}, set_shape=lambda name, lo, opt, hi: profile.shapes.update({name: (lo, opt, hi)}))
    config = ns(flags=[], profiles=[], profiling_verbosity=None)
    config.set_flag = config.flags.append
    config.add_optimization_profile = config.profiles.append
    inspector = ns(get_engine_information=lambda fmt: json.dumps({"Layers": layers}))
    engine = ns(create_engine_inspector=lambda: inspector)
    module = ns(
        Logger=type("Logger", (), {"ERROR": 1, "__init__": lambda self, level: None}),
        NetworkDefinitionCreationFlag=ns(STRONGLY_TYPED=1),
        Builder=lambda logger: ns(create_network=lambda flags: network, create_builder_config=lambda: config,
                                  create_optimization_profile=lambda: profile,
                                  build_serialized_network=lambda net, cfg: b"plan"),
        OnnxParser=lambda net, logger: ns(parse=lambda data: True, num_errors=0),
        ProfilingVerbosity=ns(DETAILED=2), BuilderFlag=ns(INT8=3), LayerInformationFormat=ns(JSON=4),
        Runtime=lambda logger: ns(deserialize_cuda_engine=lambda plan: engine))
    return module, config, profile


def test_engine_check_maps_engine_layers_to_nodes(monkeypatch, quantized_cnn):
    import sys

    import torch

    model = quantized_cnn(method="rtn", target="tensorrt").model
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    layers = [{"Name": f"{convs[0]} + /stem/stem.1/Relu", "LayerType": "CaskConvolution",
               "Inputs": [{"Format/Datatype": "Four wide channel vectorized row major Int8 format"}]},
              {"Name": convs[1], "LayerType": "CaskConvolution",
               "Inputs": [{"Format/Datatype": "Row major linear FP32"}]}]
    module, config, profile = fake_tensorrt(layers)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    report = check(model, "tensorrt")
    kernels = {l.node: l.kernel for l in report.layers}
    assert kernels[convs[0]] == "int8" and kernels[convs[1]] == "float", kernels
    assert [(f.node, f.rule) for f in report.fallbacks] == [(convs[1], "engine")], format_report(report)
    assert not report.not_verified and config.profiles and profile.shapes["input"][0] == [1, 1, 16, 16]


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("name", ["digits_vit", "tiny_lm"])
def test_bundled_transformers_pass_the_check_of_their_target(name, target):
    from helpers import MODELS

    path = MODELS / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path.name} is not bundled in this checkout")
    result = onnxflex.quantize(path, config=QuantConfig(target=target, method="rtn"), progress=False)
    report = check(result.model, target)
    assert report.ok and report.layers, format_report(report)
    by_design = {f.node for f in report.findings if f.rule == "latency-float"}  # the 4x4 patch conv (depth 16)
    assert not [l.node for l in report.layers if l.kernel in FLOAT_KERNELS and l.node not in by_design], \
        format_report(report)
    print(f"{name} {target} W8A8 RTN: {len(report.layers)} integer layers, "
          f"{min(result.report['verification']['quantized_vs_fp32_sqnr_db'].values()):.1f} dB vs FP32")
