"""Models stored with external data: they load, quantize and save without their weights ever going
through one in-memory protobuf, and the output's data file is its own."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from onnxflex import extdata
from onnxflex.config import QuantConfig
from onnxflex.errors import ModelLoadError
from onnxflex.qparams import sqnr_db

from helpers import run_model


def conv_matmul_model(seed: int = 0) -> onnx.ModelProto:
    """Conv → Relu → Reshape → MatMul → Relu → MatMul on [N, 3, 8, 8]; every weight at least 1 KiB."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape, fan_in):
        return numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name)

    inits = [weight("conv_w", 16, 3, 3, 3, fan_in=27),
             numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "conv_b"),
             numpy_helper.from_array(np.array([-1, 16 * 8 * 8], np.int64), "flat_shape"),
             weight("fc1_w", 16 * 8 * 8, 64, fan_in=1024), weight("fc2_w", 64, 10, fan_in=64)]
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "flat_shape"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fc1_w"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu_fc"),
             helper.make_node("MatMul", ["hr", "fc2_w"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "conv_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture()
def external_model(tmp_path):
    """The model saved with every initializer as external data (size_threshold=0), and its data."""
    folder = tmp_path / "input"
    folder.mkdir()
    onnx.save(conv_matmul_model(), folder / "model.onnx", save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    x = np.random.default_rng(1).standard_normal((48, 3, 8, 8)).astype(np.float32)
    return folder / "model.onnx", {"x": x}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_output(out, fp_model, feeds, min_sqnr=25.0):
    """The saved model passes the full checker by path, runs in onnxruntime and stays close to FP32."""
    onnx.checker.check_model(str(out), full_check=True)
    quantized = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    reference = run_model(fp_model, feeds)[0]
    sqnr = sqnr_db(reference, quantized)
    assert sqnr >= min_sqnr, f"SQNR {sqnr:.1f} dB < {min_sqnr} dB"


@pytest.mark.parametrize("inline_below", [extdata.INLINE_BELOW_BYTES, 1024], ids=["read-in", "kept-on-disk"])
def test_external_data_model_quantizes_and_saves_its_own_data_file(external_model, tmp_path, monkeypatch,
                                                                   inline_below):
    monkeypatch.setattr(extdata, "INLINE_BELOW_BYTES", inline_below)
    model_path, feeds = external_model
    before = {p.name: digest(p) for p in model_path.parent.iterdir()}
    result = onnxflex.quantize(model_path, feeds, QuantConfig(method="rtn", verify_samples=16, latency_rules=False),
                               progress=False)  # the shallow conv's float weight would stay external too
    assert result.report["verification"]["onnxruntime_vs_simulation_sqnr_db"]["y"] >= 30.0
    out = result.save(tmp_path / "out" / "model.q.onnx")

    assert sorted(p.name for p in out.parent.iterdir()) == ["model.q.onnx", "model.q.onnx.data",
                                                             "model.q.onnx.report.json"]
    saved = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in saved.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.q.onnx.data"}, locations
    assert not [p for p in saved.metadata_props if p.key == extdata.WEIGHTS_DIR_KEY]
    external = [t.name for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external == ["fc1_w_quantized"], external  # the int8 tensors of at least EXTERNAL_MIN_BYTES
    assert {p.name: digest(p) for p in model_path.parent.iterdir()} == before, "the input folder changed"
    check_output(out, conv_matmul_model(), feeds)


def test_large_in_memory_model_goes_to_onnxruntime_and_checker_by_path(tmp_path, monkeypatch):
    """A model over the single-file limit (lowered here to 0) is handed to onnxruntime and onnx.checker as
    a file with external data, and saved with external data, never as one serialised protobuf."""
    monkeypatch.setattr(extdata, "SINGLE_FILE_LIMIT", 0)
    given = []
    session, checker = ort.InferenceSession, onnx.checker.check_model

    def spy_session(model, *args, **kwargs):
        given.append(("onnxruntime", type(model).__name__))
        return session(model, *args, **kwargs)

    def spy_checker(model, *args, **kwargs):
        given.append(("checker", type(model).__name__))
        return checker(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy_session)
    monkeypatch.setattr(onnx.checker, "check_model", spy_checker)
    model = conv_matmul_model()
    feeds = {"x": np.random.default_rng(2).standard_normal((48, 3, 8, 8)).astype(np.float32)}
    result = onnxflex.quantize(model, feeds, QuantConfig(method="rtn", verify_samples=16), progress=False)
    out = result.save(tmp_path / "q.onnx")
    assert {kind for kind, _ in given} == {"onnxruntime", "checker"}, given
    assert all(arg == "str" for _, arg in given), given
    assert (tmp_path / "q.onnx.data").is_file()
    monkeypatch.undo()
    check_output(out, model, feeds)


def test_missing_external_data_file_is_a_load_error_naming_it(external_model):
    model_path, _ = external_model
    (model_path.parent / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match="weights.bin"):
        onnxflex.quantize(model_path, None, QuantConfig(method="rtn"), progress=False)


def test_spilled_capture_gives_the_same_model_as_one_held_in_ram(tmp_path):
    """With a 1 MiB cache every captured tensor spills to disk and is read back batch by batch; the
    learned model is byte for byte the one a run holding everything in RAM writes."""
    from helpers import CNN

    options = dict(method="flexround", iters=20, batch_size=16, calib_samples=96, verify_samples=16)
    in_ram = onnxflex.quantize(CNN, None, QuantConfig(**options), progress=False)
    spilled = onnxflex.quantize(CNN, None, QuantConfig(max_cache_mb=1, **options), progress=False)
    assert spilled.model.SerializeToString() == in_ram.model.SerializeToString()


def test_disk_array_reads_and_writes_rows(tmp_path):
    from onnxflex.cache import DiskArray

    values = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2)
    array = DiskArray(tmp_path / "a.bin", values.shape, values.dtype)
    array[0:2] = values[0:2]
    array[2:5] = values[2:5]
    np.testing.assert_array_equal(np.asarray(array), values)
    np.testing.assert_array_equal(array[1:4], values[1:4])
    np.testing.assert_array_equal(array[np.array([4, 0, 4])], values[[4, 0, 4]])
    np.testing.assert_array_equal(array[3], values[3])
    array.close()


def test_timing_sessions_keep_weight_prepacking_on_a_model_given_by_path(monkeypatch):
    """onnxflex's own sessions on a model that goes by path run without weight prepacking (no second
    copy of the weights); a timing session keeps it, as a user's session has it (MatMulNBits without
    its packed weight repacks on every run: a quantized model would time many times slower than it runs)."""
    from onnxflex import ort as oort
    from onnxflex import speed

    monkeypatch.setattr(extdata, "SINGLE_FILE_LIMIT", 0)
    model = conv_matmul_model()
    feed = {"x": np.zeros((2, 3, 8, 8), np.float32)}

    def prepacking(sess) -> str:
        try:
            return sess.get_session_options().get_session_config_entry("session.disable_prepacking")
        except RuntimeError:  # the entry was never set
            return "unset"

    assert prepacking(oort.session(model, list(oort.CPU))) == "1"
    assert all(prepacking(s) != "1" for s in oort.timing_sessions([model, model], feed, threads=1))
    opened = []
    real = oort.session

    def spy(*args, **kwargs):
        sess = real(*args, **kwargs)
        opened.append(prepacking(sess))
        return sess

    monkeypatch.setattr(oort, "session", spy)
    speed.measured_ratio(model, model, feed, threads=1, seconds=0.0)
    assert len(opened) == 2 and "1" not in opened, opened


def test_external_tensors_are_read_straight_from_their_file(external_model):
    """tensor_array reads a plain numeric external tensor from its file into one array, with the values
    onnx's own loader gives; a location outside the model's folder is left to onnx's loader to refuse."""
    model_path, _ = external_model
    full = onnx.load(str(model_path))
    skeleton = onnx.load(str(model_path), load_external_data=False)
    folder = str(model_path.parent)
    for tensor, loaded in zip(skeleton.graph.initializer, full.graph.initializer):
        direct = extdata._read_external(tensor, folder)
        assert direct is not None and direct.flags.writeable, tensor.name
        np.testing.assert_array_equal(direct, numpy_helper.to_array(loaded))
        assert direct.dtype == numpy_helper.to_array(loaded).dtype
    outside = onnx.TensorProto()
    outside.CopyFrom(skeleton.graph.initializer[0])
    for entry in outside.external_data:
        if entry.key == "location":
            entry.value = "../weights.bin"
    assert extdata._read_external(outside, folder) is None


def test_frozen_integers_of_an_offloaded_model_live_in_a_file_backed_map(external_model, tmp_path, monkeypatch):
    """A model whose weights stay on disk keeps its frozen integers in memory maps of unlinked files
    (spill.file_backed), not in the run's heap; the written model is the same byte for byte."""
    from onnxflex.rounding import reconstruct

    model_path, feeds = external_model
    config = QuantConfig(method="rtn", wbits=4, abits=8, verify_samples=16)
    monkeypatch.setattr(extdata, "INLINE_BELOW_BYTES", 1024)
    assert reconstruct.is_offloaded(extdata.load_offloaded(model_path))  # its larger weights stay on disk
    monkeypatch.setattr(reconstruct, "FILE_BACKED_BYTES", 0)  # and its small ones count as large
    mapped = onnxflex.quantize(str(model_path), feeds, config, progress=False)
    kinds = {type(qw.ints) for qw in mapped.params.weights.values()}
    assert kinds == {np.memmap}, kinds
    monkeypatch.setattr(reconstruct, "is_offloaded", lambda model: False)
    held = onnxflex.quantize(str(model_path), feeds, config, progress=False)
    assert {type(qw.ints) for qw in held.params.weights.values()} == {np.ndarray}
    a, b = mapped.save(tmp_path / "a.onnx"), held.save(tmp_path / "b.onnx")
    assert onnx.load(str(a)).SerializeToString() == onnx.load(str(b)).SerializeToString()


def test_an_offloaded_models_learning_gives_weight_sized_temporaries_back_and_recomputes_rounding(
        external_model, tmp_path, monkeypatch):
    """A model whose weights stay on disk learns inside reused_pages(bounded=True) (allocations of
    heap.BOUNDED_MMAP or more are mmapped, so freed weight-sized tensors leave the process; round to
    nearest, which learns nothing, keeps the unbounded policy), and with
    every weight's rounding graph recomputed in the backward (torchify.RECOMPUTE_VALUES 0) FlexRound
    writes the same model byte for byte as with none recomputed."""
    from onnxflex.rounding import heap, reconstruct, torchify

    model_path, feeds = external_model
    config = QuantConfig(method="flexround", wbits=4, abits=8, iters=6, batch_size=8, early_stop=0,
                         step_budget=0.0, verify_samples=16, seed=3)
    monkeypatch.setattr(extdata, "INLINE_BELOW_BYTES", 1024)
    settings = []
    real = heap.reused_pages
    monkeypatch.setattr(reconstruct, "reused_pages", lambda bounded=False: settings.append(bounded) or real(bounded))
    monkeypatch.setattr(torchify, "RECOMPUTE_VALUES", 0)
    recomputed = onnxflex.quantize(str(model_path), feeds, config, progress=False)
    assert settings == [True], settings
    monkeypatch.setattr(torchify, "RECOMPUTE_VALUES", 1 << 40)
    kept = onnxflex.quantize(str(model_path), feeds, config, progress=False)
    assert recomputed.report["reconstruction"]["steps_run"] > 0
    a, b = recomputed.save(tmp_path / "a.onnx"), kept.save(tmp_path / "b.onnx")
    assert onnx.load(str(a)).SerializeToString() == onnx.load(str(b)).SerializeToString()
    onnxflex.quantize(str(model_path), feeds, dataclasses.replace(config, method="rtn"), progress=False)
    assert settings == [True, True, False], "round to nearest holds no temporaries across steps"
    monkeypatch.setattr(reconstruct, "is_offloaded", lambda model: False)
    onnxflex.quantize(str(model_path), feeds, config, progress=False)
    assert settings == [True, True, False, False], settings


def test_copy_except_copies_every_set_field_but_the_skipped_ones():
    """extdata.copy_except (payload-free copies for onnx's converter and inference): the same message as a
    full copy with the skipped fields cleared, repeated, message and scalar fields alike."""
    tensor = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    tensor.doc_string = "a weight"
    tensor.metadata_props.add(key="origin", value="test")
    model = helper.make_model(helper.make_graph([], "g", [], [], [tensor]), producer_name="p", doc_string="m")
    model.metadata_props.add(key="k", value="v")
    for src, skip in ((tensor, {"raw_data"}), (model, {"graph"}), (model.graph, {"initializer"})):
        copied, expected = type(src)(), type(src)()
        extdata.copy_except(copied, src, skip)
        expected.CopyFrom(src)
        for name in skip:
            expected.ClearField(name)
        assert copied == expected and copied.ListFields(), (type(src).__name__, copied, expected)
