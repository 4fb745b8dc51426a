"""Calibration sources: readers, iterables, folders, images, synthetic data, and their errors."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from helpers import CNN, MODELS, run_cli
from onnxflex.config import QuantConfig
from onnxflex.errors import CalibrationError
from onnxflex.options import resolve as resolve_options
from onnxflex.sources import ImageFolder, resolve_calibration, synthetic_calibration

FAST = dict(method="flexround", iters=10, seed=5, calib_samples=96)


@pytest.fixture(scope="module")
def cnn_model():
    return onnx.load(str(CNN))


@pytest.fixture(scope="module")
def calib_images():
    with np.load(MODELS / "digits_cnn.calib.npz") as data:
        return data["input"]


class Reader:
    """Shaped like onnxruntime's CalibrationDataReader: get_next() gives a feed dict, then None."""

    def __init__(self, images, batch):
        self._feeds = iter([{"input": images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self._feeds, None)


def resolve(source, model, config=QuantConfig()):
    return resolve_calibration(source, model, None, resolve_options(config).data)


def test_cli_reader_and_iterable_give_identical_files(tmp_path, calib_images):
    cli_out = tmp_path / "cli.onnx"
    flags = ["--method", FAST["method"], "--iters", str(FAST["iters"]), "--seed", str(FAST["seed"]),
             "--calib-samples", str(FAST["calib_samples"])]
    done = run_cli("quantize", str(CNN), "--calib", str(MODELS / "digits_cnn.calib.npz"), "-o", str(cli_out),
                   "--quiet", *flags)
    assert done.returncode == 0, done.stderr
    config = QuantConfig(**FAST)
    reader_out = onnxflex.quantize(CNN, Reader(calib_images, 16), config, progress=False).save(tmp_path / "r.onnx")
    feeds = ({"input": image} for image in calib_images)  # one unbatched sample per feed
    iter_out = onnxflex.quantize(CNN, feeds, config, progress=False).save(tmp_path / "i.onnx")
    reference = cli_out.read_bytes()
    assert reader_out.read_bytes() == reference, "CalibrationDataReader run differs from the CLI run"
    assert iter_out.read_bytes() == reference, "iterable run differs from the CLI run"


def test_reader_and_iterable_stack_samples(cnn_model, calib_images):
    from_reader = resolve(Reader(calib_images[:40], 16), cnn_model)
    from_list = resolve([{"input": x} for x in calib_images[:40]], cnn_model)
    assert from_reader.num_samples == from_list.num_samples == 40
    np.testing.assert_array_equal(from_reader.arrays["input"], calib_images[:40])
    np.testing.assert_array_equal(from_list.arrays["input"], calib_images[:40])


def test_reader_with_a_wrong_input_name_names_both(cnn_model, calib_images):
    with pytest.raises(CalibrationError, match=r"feeds 'pixels'.*inputs are 'input'"):
        resolve([{"pixels": calib_images[:4]}], cnn_model)


def test_reader_with_a_wrong_shape_names_the_input_and_expected_shape(cnn_model):
    with pytest.raises(CalibrationError, match=r"input 'input' has shape \[4, 1, 8, 8\].*\[\?, 1, 16, 16\]"):
        resolve(Reader(np.zeros((4, 1, 8, 8), np.float32), 2), cnn_model)


def test_iterable_with_inf_names_the_input(cnn_model, calib_images):
    bad = calib_images[:8].copy()
    bad[2, 0, 3, 3] = np.inf
    with pytest.raises(CalibrationError, match="input 'input' contains NaN or Inf"):
        resolve([{"input": bad}], cnn_model)


def test_empty_reader_is_an_error_naming_the_expected_input(cnn_model):
    with pytest.raises(CalibrationError, match=r"empty.*expected dicts with 'input'"):
        resolve(Reader(np.zeros((0, 1, 16, 16), np.float32), 4), cnn_model)


def test_non_dict_feeds_are_refused(cnn_model):
    with pytest.raises(CalibrationError, match=r"item 1 is a ndarray.*'input'|item 1 is a ndarray.*input"):
        resolve([np.zeros((1, 16, 16), np.float32)], cnn_model)


def test_too_few_samples_for_the_batch_names_the_input(calib_images):
    with pytest.raises(CalibrationError, match=r"input\(s\) 'input' have 20 samples.*batches of 32.*--batch-size"):
        onnxflex.quantize(CNN, {"input": calib_images[:20]}, QuantConfig(iters=5), progress=False)


def test_unsupported_source_type_says_what_is_accepted(cnn_model):
    with pytest.raises(CalibrationError, match="unsupported calibration source of type int"):
        resolve(42, cnn_model)


def test_folder_of_npy_and_npz_files(tmp_path, cnn_model, calib_images):
    npy, npz = tmp_path / "npy", tmp_path / "npz"
    npy.mkdir(), npz.mkdir()
    for i in range(5):
        np.save(npy / f"{i:02d}.npy", calib_images[i * 4:(i + 1) * 4])
        np.savez(npz / f"{i:02d}.npz", input=calib_images[i])
    np.testing.assert_array_equal(resolve(npy, cnn_model).arrays["input"], calib_images[:20])
    np.testing.assert_array_equal(resolve(npz, cnn_model).arrays["input"], calib_images[:5])


def test_folder_without_data_files_is_an_error(tmp_path, cnn_model):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CalibrationError, match="holds no .npy, .npz or image files"):
        resolve(tmp_path, cnn_model)


def _write_pngs(folder, count, size, mode):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(count, size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p if mode == "RGB" else p[..., 0], mode).save(folder / f"{i:03d}.png")
    return pixels


def test_image_folder_infers_size_layout_and_channels_from_the_model(tmp_path, cnn_model):
    pixels = _write_pngs(tmp_path / "img", 6, (16, 16), "L")
    data = resolve(tmp_path / "img", cnn_model)  # a plain folder path, as --calib DIR gives it
    assert data.arrays["input"].shape == (6, 1, 16, 16) and data.arrays["input"].dtype == np.float32
    np.testing.assert_allclose(data.arrays["input"][:, 0], pixels[..., 0] / 255.0, rtol=1e-6)


def test_image_folder_resize_crop_normalise_nhwc(tmp_path):
    pixels = _write_pngs(tmp_path / "img", 3, (40, 30), "RGB")  # width 40, height 30
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 20, 20, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 20, 20, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    spec = ImageFolder(tmp_path / "img", resize=30, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    got = spec.load(model).arrays["x"]
    assert got.shape == (3, 20, 20, 3)
    # shorter side is already 30, so the crop is the centre 20x20 of the original pixels
    expected = (pixels[:, 5:25, 10:30] / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.3])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _dynamic_conv_model():
    w = numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_synthetic_data_needs_input_shape_for_unknown_dims():
    with pytest.raises(CalibrationError, match=r"input 'x' has unknown dimensions \[\?, 3, \?, \?\].*--input-shape x:1x3xNxN"):
        synthetic_calibration(_dynamic_conv_model(), resolve_options(QuantConfig()).data)
    data = synthetic_calibration(_dynamic_conv_model(), resolve_options(QuantConfig(input_shapes=("x:1x3x8x8",), synthetic_samples=40)).data)
    assert data.arrays["x"].shape == (40, 3, 8, 8) and data.arrays["x"].dtype == np.float32
    with pytest.raises(CalibrationError, match=r"does not fit the model's input 'x'"):
        synthetic_calibration(_dynamic_conv_model(), resolve_options(QuantConfig(input_shapes=("x:1x4x8x8",))).data)
    with pytest.raises(CalibrationError, match="names y, which the model does not have"):
        synthetic_calibration(_dynamic_conv_model(), resolve_options(QuantConfig(input_shapes=("y:1x3x8x8",))).data)


def test_synthetic_samples_lie_on_the_batch_axis_of_a_state_input():
    """A streaming model's state [2, ?, 128] carries its batch on axis 1: synthetic samples go there
    (the one unknown dim), and the hint for a missing shape puts its 1 on that axis."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["", ""])
    state = helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x, state], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(CalibrationError, match=r"--input-shape x:1xN with N filled in"):
        synthetic_calibration(model, QuantConfig())
    data = synthetic_calibration(model, QuantConfig(input_shapes=("x:1x6",), synthetic_samples=10))
    assert data.layout.axis("state") == 1 and data.layout.axis("x") == 0
    assert data.arrays["x"].shape == (10, 6) and data.arrays["state"].shape == (10, 2, 4)  # samples first
    data = synthetic_calibration(model, QuantConfig(input_shapes=("x:6x1",), batch_axes=("x=1",), synthetic_samples=10))
    assert data.layout.axis("x") == 1 and data.arrays["x"].shape == (10, 6)


def test_synthetic_samples_of_a_fixed_batch_of_1_lie_on_axis_0_not_on_the_free_width():
    """An OCR export declares [1, 1, 64, W]: its batch is fixed at 1 and W is the text line's width, so
    the samples go on axis 0 (they went on W, which made one sample 128 columns wide)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 64, "image_width"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(CalibrationError, match=r"--input-shape x:1x1x64xN with N filled in"):
        synthetic_calibration(model, QuantConfig())
    data = synthetic_calibration(model, QuantConfig(input_shapes=("x:1x1x64x160",), synthetic_samples=10))
    assert data.layout.axis("x") == 0 and data.num_samples == 10
    assert data.arrays["x"].shape == (10, 1, 64, 160)


def test_synthetic_token_ids_stay_below_the_vocabulary():
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), "emb")
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["e"]),
                               helper.make_node("MatMul", ["e", "w"], ["y"])], "g", [ids], [y], [table, w])
    data = synthetic_calibration(helper.make_model(graph), resolve_options(QuantConfig()).data)
    assert data.arrays["ids"].dtype == np.int64 and 0 <= data.arrays["ids"].min() and data.arrays["ids"].max() < 50


def test_model_without_data_quantizes_on_synthetic_inputs_with_a_warning(tmp_path, caplog):
    model = tmp_path / "alone.onnx"
    model.write_bytes(CNN.read_bytes())  # no alone.calib.npz beside it
    with caplog.at_level(logging.WARNING, logger="onnxflex"):
        result = onnxflex.quantize(model, config=QuantConfig(method="rtn"), progress=False)
    assert any("synthetic" in r.message and "accuracy will suffer" in r.message for r in caplog.records)
    assert result.report["calibration"]["source"] == "synthetic data"
    assert result.report["calibration"]["reconstruction_samples"] + result.report["calibration"][
        "verification_samples"] == 128


def test_cli_asks_for_input_shape_on_dynamic_models(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_conv_model(), str(path))
    done = run_cli("quantize", str(path), "-o", str(tmp_path / "q.onnx"), timeout=300)
    assert done.returncode == 2
    assert "--input-shape x:1x3xNxN" in done.stderr, done.stderr
