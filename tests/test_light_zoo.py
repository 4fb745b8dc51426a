"""The light_* model-zoo graphs that the onnx wheel ships (onnx/backend/test/data/light): opset 9, IR 3,
every initializer also listed as a graph input, the large weights made by ConstantOfShape (a constant
0.02, so the classifiers' outputs are the same for every class), Reshape targets as OC2_DUMMY
initializers, LRN, Dropout, many-input Sum and opset-9 Softmax.

Each must pass ``onnxflex inspect`` and quantize at W8A8 with ``--method rtn`` into a model that passes
onnx.checker (full), runs in onnxruntime, matches the torch simulation (the default 30 dB) and runs
its Conv/Gemm layers as QLinearConv/QGemm.
"""
from __future__ import annotations

import glob
import os
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxflex
from onnxflex.check import check
from onnxflex.cli import main

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
MODELS = sorted(glob.glob(os.path.join(LIGHT, "light_*.onnx")))
SAMPLES = 12  # 9 to calibrate, 3 held out to verify (at most a quarter): these graphs are heavy


def test_the_onnx_wheel_ships_light_models():
    assert MODELS, f"no light_*.onnx under {LIGHT}: the installed onnx wheel no longer ships them"


def _data_input(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    (name,) = [i.name for i in model.graph.input if i.name not in inits]
    return name


@pytest.mark.parametrize("path", MODELS, ids=lambda p: os.path.basename(p)[len("light_"):-len(".onnx")])
def test_light_model_inspects_and_quantizes_rtn_w8a8(path, tmp_path):
    name = os.path.basename(path)
    t0 = time.perf_counter()
    shown = CliRunner().invoke(main, ["inspect", path], catch_exceptions=False)
    assert shown.exit_code == 0, f"{name}: inspect exited {shown.exit_code}: {shown.output[-500:]}"
    assert "upgraded the model from opset 9 to 13" in shown.output, shown.output[:500]
    assert "runs in onnxruntime" not in shown.output, f"{name}: a block has no torch converter: {shown.output}"

    model = onnx.load(path)
    x = np.random.default_rng(0).standard_normal((SAMPLES, 3, 224, 224)).astype(np.float32)
    config = onnxflex.QuantConfig(method="rtn", wbits=8, abits=8, verify_samples=4, device="cpu")
    result = onnxflex.quantize(path, {_data_input(model): x}, config, progress=False)
    out = result.save(tmp_path / "q.onnx")
    seconds = time.perf_counter() - t0

    onnx.checker.check_model(str(out), full_check=True)
    v = result.report["verification"]
    sim = min(v["onnxruntime_vs_simulation_sqnr_db"].values())
    fp32 = min(v["quantized_vs_fp32_sqnr_db"].values())
    plan = result.report["plan"]
    summary = (f"{name}: {plan['blocks']} blocks, {plan['layers']} layers, onnxruntime vs simulation {sim:.1f} dB, "
               f"vs FP32 {fp32:.1f} dB, {seconds:.1f} s")
    print(summary)
    assert v["samples"] >= 3 and sim >= 30.0, summary
    shallow = len(result.report["latency_rules"]["kept_float"])  # depthwise and thin convs stay float by design
    weighted = sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm")) - shallow
    assert plan["layers"] >= weighted, f"{summary}; the model has {weighted} Conv/Gemm nodes beside {shallow} shallow"
    report = check(str(out), "onnxruntime", runtime=True)
    assert report.ok, f"{summary}; check: {report.to_dict()}"
    assert len({f.node for f in report.findings if f.rule == "latency-float"}) == shallow, report.to_dict()
    ops = v["optimized_graph_ops"]
    assert ops.get("QLinearConv", 0) + ops.get("QGemm", 0) >= weighted, f"{summary}; optimized ops {ops}"
