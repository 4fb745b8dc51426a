"""The paddle2onnx and tf2onnx zoo models (tests/zoo/paddle.json, tests/zoo/tf.json) are present, valid,
run in onnxruntime on their manifest's feeds, and keep the exporters' headers as written."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.helper import tensor_dtype_to_np_dtype

from zoo_models import ZOO, zoo_models

MANIFESTS = ("paddle.json", "tf.json")
NAMES = [e["name"] for m in MANIFESTS for e in json.loads((ZOO / m).read_text())["models"]]
MODELS = {z.name: z for z in zoo_models() if z.name in NAMES}


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def test_manifests_list_the_models():
    assert len(NAMES) == len(set(NAMES)) == len(MODELS) >= 7, f"names {NAMES}, loaded {sorted(MODELS)}"


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_runs_on_its_feeds(name):
    zoo = MODELS[name]
    assert zoo.path.is_file(), f"{zoo.path} is missing"
    assert zoo.path.stat().st_size < 1_000_000, f"{zoo.path.name} is {zoo.path.stat().st_size} bytes"
    model = onnx.load(zoo.path)
    onnx.checker.check_model(model)
    feeds = zoo.feeds(4)
    declared = {i.name: tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    assert {k: v.dtype for k, v in feeds.items()} == declared, f"feeds {feeds.keys()} vs inputs {declared}"
    session = ort.InferenceSession(str(zoo.path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    for out, info in zip(outputs, session.get_outputs()):
        assert out.shape[0] == 4, f"{info.name}: shape {out.shape}, 4 samples fed"
        assert np.isfinite(out).all(), f"{info.name}: {np.count_nonzero(~np.isfinite(out))} non-finite values"


@pytest.mark.parametrize("name, ir, opset, dims", [
    ("paddle_cls", 6, 11, ["DynamicDimension.0", 3, 48, 192]),
    ("paddle_cls_m1", 6, 11, [-1, 3, 48, 192]),
    ("paddle_rec", 7, 12, ["DynamicDimension.0", 3, 32, "DynamicDimension.1"]),
    ("paddle_rec_m1", 7, 12, [-1, 3, 32, -1]),
    ("tf_cnn", 7, 13, ["unk__", 32, 32, 3]),
    ("tf_text", 7, 13, ["unk__", 24]),
    ("tf_jax_mlp", 7, 13, ["unk__", 16]),
])
def test_zoo_header_is_as_exported(name, ir, opset, dims):
    """The exporters' quirks are what the zoo is for: a file 'fixed' by hand fails here."""
    model = onnx.load(MODELS[name].path, load_external_data=False)
    found = _dims(model.graph.input[0])
    found = [d[:5] if isinstance(d, str) and d.startswith("unk__") else d for d in found]
    default_opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert (model.ir_version, default_opset, found) == (ir, opset, dims), \
        f"{name}: ir {model.ir_version}, opset {default_opset}, input dims {_dims(model.graph.input[0])}"
