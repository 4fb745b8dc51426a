"""The torch zoo (tests/zoo/torch.json) is what its manifest says: each file exists, passes the full onnx
checker, declares exactly the manifest's inputs, and runs in onnxruntime on the feeds the manifest
generates, with finite outputs whose batch follows the samples."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from zoo_models import ZOO, ZooModel, zoo_models  # tests/ is on pytest's pythonpath

MANIFEST = ZOO / "torch.json"
NAMES = [entry["name"] for entry in json.loads(MANIFEST.read_text())["models"]]
MODELS = {m.name: m for m in zoo_models() if m.name in NAMES}
SAMPLES = 4


def test_manifest_lists_every_torch_model():
    expected = {"torchscript_mbnet", "dynamo_resnet", "bert_tiny", "vit_tiny", "gpt2_tiny_past", "yolo_head",
                "vad_stream", "vad_stream_gru"}
    assert set(NAMES) == expected, f"torch.json lists {sorted(NAMES)}"
    assert len(NAMES) == len(MODELS), f"zoo_models() found {sorted(MODELS)} of {NAMES} (a name clash?)"


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_runs_on_manifest_feeds(name):
    model: ZooModel = MODELS[name]
    assert model.path.is_file(), f"{model.path} missing"
    proto = onnx.load(str(model.path))
    onnx.checker.check_model(proto, full_check=True)
    initializers = {init.name for init in proto.graph.initializer}
    declared = [i.name for i in proto.graph.input if i.name not in initializers]
    assert sorted(declared) == sorted(model.inputs), f"{name}: graph inputs {declared} vs manifest {list(model.inputs)}"
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, model.feeds(SAMPLES))
    for meta, value in zip(session.get_outputs(), outputs):
        assert np.isfinite(value).all(), f"{name}: output {meta.name} has non-finite values"
    batch_axis = 1 if name.startswith("vad_stream") else 0
    first = outputs[0]
    assert first.shape[0] == SAMPLES, f"{name}: first output {session.get_outputs()[0].name} shape {first.shape}"
    if name.startswith("vad_stream"):
        assert outputs[1].shape == (2, SAMPLES, 128), f"{name}: new state shape {outputs[1].shape}"
        assert model.batch_axes == {"state": batch_axis} and model.fix_inputs == {"sr": 16000}, model
