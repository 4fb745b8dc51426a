"""bench/real_models.py without the network: its metrics, data builders, task table, table writer, the
wheel cache, and one quantization child of each kind on the bundled digits CNN."""
from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile

import numpy as np
import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_memory  # noqa: E402  (bench/ is not a package)
import real_data  # noqa: E402
import real_metrics  # noqa: E402
import real_models  # noqa: E402
import real_tasks  # noqa: E402
from child import run_measured  # noqa: E402


# --- metrics ----------------------------------------------------------------------------------------


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    steps = [0, 3, 3, 0, 3, 1, 1, 0, 2]
    logits = np.eye(4)[steps][None]
    assert real_metrics.ctc_greedy(logits) == [[3, 3, 1, 2]]
    assert real_metrics.decode(logits, ["", "a", "b", "c"]) == ["ccab"]


def test_text_accuracy_counts_lines_and_edits():
    line, char = real_metrics.text_accuracy(["abc", "abd", ""], ["abc", "abc", "xy"])
    assert line == pytest.approx(1 / 3)
    assert char == pytest.approx(1 - 3 / 8), f"char accuracy {char:.3f}: 1 substitution + 2 deletions of 8"
    assert real_metrics.edit_distance("kitten", "sitting") == 3


def test_mask_iou_and_detection_f1():
    a = np.zeros((2, 4, 4), bool)
    b = a.copy()
    a[0, :2], b[0, :1] = True, True  # IoU 0.5 on the first, both empty (1.0) on the second
    assert real_metrics.mask_iou(a, b) == pytest.approx(0.75)
    ref = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([1, 2]))]
    got = [(np.array([[1, 1, 10, 10], [20, 20, 30, 30]], float), np.array([1, 1]))]  # second has the wrong class
    assert real_metrics.detection_f1(ref, got) == pytest.approx(0.5)
    assert real_metrics.detection_f1([(np.zeros((0, 4)), np.zeros(0))], [(np.zeros((0, 4)), np.zeros(0))]) == 1.0


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    kept = real_metrics.nms(boxes, np.array([0.5, 0.9, 0.7]), 0.45)
    assert kept.tolist() == [1, 2]


def test_paired_rows_pick_onnxruntimes_best_and_count_only_ours_and_only_theirs():
    agree = lambda *v: np.array(v, bool)  # noqa: E731
    results = [
        {"model": "m", "toolkit": "onnxflex", "setting": "rtn W8A8", "bits": "W8A8", "agree": agree(1, 1, 1, 0, 1)},
        {"model": "m", "toolkit": "onnxruntime", "setting": "quantize_static MinMax U8S8", "bits": "W8A8",
         "agree": agree(1, 0, 0, 0, 1)},
        {"model": "m", "toolkit": "onnxruntime", "setting": "quantize_static Percentile U8S8", "bits": "W8A8",
         "agree": agree(0, 1, 1, 1, 1)},
        {"model": "m", "toolkit": "onnxruntime", "setting": "quantize_static MinMax U8S4", "bits": "W4A8",
         "agree": agree(1, 1, 1, 1, 1)},
    ]
    real_models.pair_rows(results)
    assert results[0]["paired"] == "+1 / -1 vs Percentile U8S8, p = 1", results[0]["paired"]
    assert "paired" not in results[1]
    assert bench_memory.paired_counts(agree(1, 1, 1, 1, 1, 1), agree(0, 0, 0, 0, 0, 0))[2] == pytest.approx(2 / 64)


def test_sqnr_of_a_known_noise():
    from onnxflex.qparams import sqnr_db

    signal = np.ones(1000)
    assert sqnr_db(signal, signal + 0.1) == pytest.approx(20.0, abs=1e-6)


# --- data builders ----------------------------------------------------------------------------------


def test_rendered_lines_are_seeded_and_preprocessed_as_rapidocr():
    first = real_data.render_line("Total 42", 48, 200, np.random.default_rng(3))
    again = real_data.render_line("Total 42", 48, 200, np.random.default_rng(3))
    assert first.shape == (48, 200, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert first.std() > 10, f"pixel std {first.std():.1f}: no text drawn"
    x = real_data.ppocr_line_input(first[..., ::-1], 48, 320)
    assert x.shape == (3, 48, 320) and -1.0 <= x.min() and x.max() <= 1.0
    assert np.all(x[:, :, 200:] == 0), "rapidocr pads the right with zeros"


def test_generated_images_and_audio_have_the_model_shapes():
    rng = np.random.default_rng(0)
    scene = real_data.text_scene(96, 128, rng)
    assert scene.shape == (96, 128, 3) and scene.dtype == np.uint8
    det = real_data.ddddocr_det_input(scene, 64)
    assert det.shape == (3, 64, 64) and det[:, 60:].max() == det[:, 60:].min() == 114, "bottom padding is 114"
    figure = real_data.figure_scene(80, 80, rng)
    assert real_data.nudenet_input(figure, 32).shape == (3, 32, 32)
    assert real_data.ddddocr_ocr_input(real_data.render_line("ab3x", 40, 160, rng)).shape == (1, 64, 256)
    chunks = real_data.vad_chunks(2, 3, rng)
    assert chunks.shape == (3, 2, 576)
    np.testing.assert_array_equal(chunks[1, :, :64], chunks[0, :, -64:]), "each chunk starts with the last 64 of the one before"


# --- the task table ---------------------------------------------------------------------------------


def test_task_table_is_pinned_and_complete():
    assert len(real_tasks.TASKS) >= 5
    for name, task in real_tasks.TASKS.items():
        assert task.name == name and task.kind
        assert re.fullmatch(r"[a-z0-9-]+==\d+(\.\d+)+", task.wheel), f"{name}: wheel {task.wheel!r} is not pinned"
        assert task.member.endswith(".onnx") and not task.member.startswith("/"), f"{name}: member {task.member!r}"
        for method in ("samples", "run", "metric", "decisions"):
            assert callable(getattr(task, method, None)), f"{name} has no {method}"
        assert task.batch >= 1 and task.timing_batch >= 1


def test_candidates_follow_the_flags():
    task = real_tasks.TASKS["ppocr_cls"]
    args = argparse.Namespace(bits=["W8A8", "W4"], methods=["rtn", "flexround"], presets=["fast"], iters=20,
                              types=["U8S8", "U8S4"], calibrators=["MinMax", "Entropy"])
    rows = real_models.candidates(task, args, weight_only=False)
    labels = [r["setting"] for r in rows]
    assert labels == ["rtn W8A8", "flexround W8A8 --preset fast iters=20", "quantize_static MinMax U8S8",
                      "quantize_static Entropy U8S8"], labels
    assert "iters" not in rows[0]["options"] and rows[1]["options"]["iters"] == 20
    with_matmuls = [r["setting"] for r in real_models.candidates(task, args, weight_only=True)]
    assert "rtn W4 g32" in with_matmuls and "MatMulNBits RTN W4 g32 symmetric" in with_matmuls \
        and "MatMulNBits RTN W4 g32 asymmetric" in with_matmuls, with_matmuls
    w4 = next(r for r in real_models.candidates(task, args, weight_only=True) if r["setting"] == "rtn W4 g32")
    assert "Conv" in w4["options"]["exclude_op_types"] and "LSTM" in w4["options"]["exclude_op_types"] \
        and not {"MatMul", "Gemm"} & set(w4["options"]["exclude_op_types"]), w4["options"]
    args.act_scales = ["mse", "percentile"]
    rows = real_models.candidates(task, args, weight_only=True)
    scaled = [(r["setting"], r["options"].get("act_scale")) for r in rows if r["toolkit"] == "onnxflex"]
    assert scaled[:2] == [("rtn W8A8 --act-scale mse", "mse"), ("rtn W8A8 --act-scale percentile", "percentile")]
    assert ("rtn W4 g32", None) in scaled and len(scaled) == 6, scaled  # weight-only rows once, without
    args.act_scales = []
    args.latency_rules, args.methods, args.types = "both", ["rtn"], ["U8S8"]
    rows = real_models.candidates(task, args, weight_only=False)
    assert [r["setting"] for r in rows][:2] == ["rtn W8A8", "rtn W8A8 --no-latency-rules"], rows
    assert [r["options"]["latency_rules"] for r in rows[:2]] == [True, False]


# --- the result table -------------------------------------------------------------------------------


def test_report_writes_rows_failures_and_pairs(monkeypatch):
    monkeypatch.setattr(real_models, "machine", lambda: "test machine")
    fp32 = {"model": "ppocr_cls", "toolkit": "FP32", "setting": "reference", "bits": "", "metric": {"accuracy": 1.0},
            "items": 4, "bytes": 2 ** 20}
    ours = {"model": "ppocr_cls", "toolkit": "onnxflex", "setting": "rtn W8A8", "bits": "W8A8",
            "metric": {"accuracy": 0.75}, "agree": np.array([1, 1, 0, 1], bool), "sqnr_db": 25.04, "seconds": 3.0,
            "peak_rss_mib": 300.2, "latency_ratio": 0.9, "bytes": 2 ** 19}
    theirs = {**ours, "toolkit": "onnxruntime", "setting": "quantize_static MinMax U8S8", "note": "opset 11 converted",
              "agree": np.array([1, 0, 0, 1], bool)}
    failed = {"model": "ppocr_cls", "toolkit": "onnxruntime", "setting": "quantize_static Entropy U8S8",
              "bits": "W8A8", "error": "timed out after 60 s"}
    args = argparse.Namespace(argv=["--quick"], models=["ppocr_cls"], calib_samples=4, eval_samples=4, note="",
                              presets=["fast"], iters=20)
    text = real_models.report([fp32, ours, theirs, failed], args, {"date": "2026-01-01 00:00 UTC", "load": "0.1"}, 60)
    assert "`python bench/real_models.py --quick`, 2026-01-01 00:00 UTC" in text and "test machine" in text
    assert "--preset fast cut to 20 iterations per block" in text
    table = [line for line in text.splitlines() if line.startswith("| ppocr_cls")]
    assert len(table) == 4 and all(line.count("|") == 12 for line in table), table
    assert "| rtn W8A8 | accuracy 0.750 | 1 of 4 | +1 / -0 vs MinMax U8S8, p = 1 | 25.0 | 3.0 s | 300 MiB | 0.90 |" \
        in table[1], table[1]
    assert "(opset 11 converted)" in table[2] and "failed: timed out after 60 s" in table[3]
    block = bench_memory.replace_block("# x\n\n<!-- real-models -->\nSTALE TABLE\n<!-- /real-models -->\n", "real-models", text)
    assert "STALE TABLE" not in block and text.strip() in block


# --- the wheel cache and the children -----------------------------------------------------------------


def test_fetch_unpacks_a_cached_wheel_without_pip(tmp_path):
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "some_pkg-1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("some_pkg/model.onnx", b"not really")
    folder = real_models.fetch("some-pkg==1.2", tmp_path)
    assert (folder / "some_pkg" / "model.onnx").read_bytes() == b"not really"
    assert real_models.fetch("some-pkg==1.2", tmp_path) == folder


def test_child_time_limit_kills_and_says_so():
    got = run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert got == {"error": "timed out after 0 s"}, got


@pytest.mark.parametrize("kind,options", [
    ("onnxflex", {"method": "rtn", "calib_samples": 0, "verify_samples": 0}),
    ("ort_static", {"batch": 8, "types": "QUInt8_QInt8", "calibrate": "MinMax"}),
])
def test_real_child_quantizes_the_bundled_cnn(tmp_path, kind, options):
    import onnxruntime as ort

    with np.load(ROOT / "models" / "digits_cnn.calib.npz") as data:
        x = data["input"][:16]
    np.savez(tmp_path / "calib.npz", input=x)
    out = tmp_path / f"{kind}.onnx"
    got = run_measured([sys.executable, str(ROOT / "bench" / "real_child.py"), kind, str(ROOT / "models" / "digits_cnn.onnx"),
                        str(tmp_path / "calib.npz"), str(out), json.dumps(options)], timeout=120)
    assert "error" not in got, got
    assert got["seconds"] > 0 and 30 < got["peak_rss_mib"] < 2000, got
    ops = {n.op_type for n in __import__("onnx").load(str(out)).graph.node}
    assert "QuantizeLinear" in ops or "DequantizeLinear" in ops, ops
    fp32, quant = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                   for p in (ROOT / "models" / "digits_cnn.onnx", out))
    agree = float((fp32.argmax(-1) == quant.argmax(-1)).mean())
    assert agree >= 0.9, f"{kind}: argmax agreement {agree:.3f} < 0.9 on 16 calibration digits"


@pytest.mark.parametrize("symmetric", [True, False])
def test_real_child_packs_the_bundled_vit_matmuls_as_matmulnbits(tmp_path, symmetric):
    import onnx

    out = tmp_path / "nbits.onnx"
    model = ROOT / "models" / "digits_vit.onnx"
    got = run_measured([sys.executable, str(ROOT / "bench" / "real_child.py"), "ort_nbits", str(model),
                        str(ROOT / "models" / "digits_vit.calib.npz"), str(out),
                        json.dumps({"block_size": 32, "symmetric": symmetric})], timeout=120)
    assert "error" not in got, got
    packed = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"]
    assert packed and got["note"].startswith(f"{len(packed)} MatMuls as MatMulNBits"), (got, len(packed))
    zero_points = {len(n.input) > 3 and bool(n.input[3]) for n in packed}
    assert zero_points == {not symmetric}, f"symmetric={symmetric}: zero-point inputs {zero_points}"


def test_child_killed_by_a_signal_says_which():
    got = run_measured([sys.executable, "-c", "import os, signal, sys; print('noise', file=sys.stderr); "
                        "os.kill(os.getpid(), signal.SIGKILL)"], timeout=30)
    assert got == {"error": "killed by SIGKILL (the kernel's out-of-memory killer sends this)"}, got


def test_matmul_share_counts_constant_node_weights(tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    conv_w = numpy_helper.from_array(np.zeros((4, 1, 3, 3), np.float32), "conv_w")  # 36 values, an initializer
    matmul_w = helper.make_node("Constant", [], ["mm_w"], value=numpy_helper.from_array(np.zeros((4 * 26, 4), np.float32)))
    graph = helper.make_graph(
        [matmul_w, helper.make_node("Conv", ["x", "conv_w"], ["y"]), helper.make_node("Flatten", ["y"], ["f"]),
         helper.make_node("MatMul", ["f", "mm_w"], ["z"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)], [conv_w])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    share = real_models.matmul_share(tmp_path / "m.onnx")
    assert share == pytest.approx(416 / 452), f"MatMul share {share:.3f}"


def _constant_weight_cnn(path):
    """Conv (weight and bias as Constant nodes, as Paddle exports write them) → Relu, saved to ``path``."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32))
    bias = numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=weight), helper.make_node("Constant", [], ["b"], value=bias),
         helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([-1], np.int64))),
         helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["y"], ["r"]),
         helper.make_node("Reshape", ["r", "shape"], ["out"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return rng


def test_constant_node_weights_become_initializers_and_nothing_else():
    import onnx
    sys.path.insert(0, str(ROOT / "bench"))
    import real_child

    from onnx import helper, numpy_helper
    value = numpy_helper.from_array(np.ones((2, 2), np.float32))
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=value), helper.make_node("Constant", [], ["k"], value=value),
         helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "k"], ["z"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 2])])
    model = helper.make_model(graph)
    assert real_child.constant_weights_to_initializers(model) == 1
    assert [t.name for t in model.graph.initializer] == ["w"], "only the MatMul's weight moves"
    assert [n.op_type for n in model.graph.node] == ["Constant", "MatMul", "Add"]
    onnx.checker.check_model(model, full_check=True)


def test_ort_static_u8s4_writes_4_bit_weights_for_constant_node_weights(tmp_path):
    import onnx

    rng = _constant_weight_cnn(tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(8, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    got = run_measured([sys.executable, str(ROOT / "bench" / "real_child.py"), "ort_static", str(tmp_path / "m.onnx"),
                        str(tmp_path / "calib.npz"), str(out),
                        json.dumps({"batch": 8, "types": "QUInt8_QInt4", "calibrate": "MinMax"})], timeout=120)
    assert "error" not in got, got
    assert got.get("note") == "2 Constant-node weights made initializers", got
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4, \
        f"the Conv weight is {onnx.TensorProto.DataType.Name(inits[dq.input[0]].data_type)}, not INT4"


def test_quantized_layers_counts_if_bodies_and_outer_scope_weights(tmp_path):
    import onnx
    from onnx import helper, numpy_helper
    sys.path.insert(0, str(ROOT / "bench"))
    import real_child

    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "wq")
    f = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "wf")
    scale = numpy_helper.from_array(np.ones((2,), np.float32), "s")
    conv = lambda x, wt, y: helper.make_node("Conv", [x, wt], [y])  # noqa: E731
    branch = lambda name, wt: helper.make_graph(  # noqa: E731
        [conv("x", wt, f"{name}_y")], name, [], [helper.make_tensor_value_info(f"{name}_y", onnx.TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "s"], ["wd"], axis=0), conv("x", "wd", "y0"),
         helper.make_node("If", ["c"], ["y1"], then_branch=branch("then", "wd"), else_branch=branch("else", "wf"))],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4]),
              helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y1", onnx.TensorProto.FLOAT, None)], [w, f, scale])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert real_child.quantized_layers(str(tmp_path / "m.onnx")) == (2, 3), \
        "the main Conv and the then-branch Conv read a DequantizeLinear; the else-branch Conv reads a float weight"
    assert real_child.quantized_layers(str(tmp_path / "m.onnx"), ops=("MatMul",)) == (0, 0)
    assert real_child.with_coverage({"note": "x"}, str(tmp_path / "m.onnx")) == \
        {"note": "x, weights of 2 of 3 weighted layers quantized"}
    assert real_child.with_coverage({}, str(tmp_path / "m.onnx"), ops=("MatMul",)) == {}


def test_plain_gemms_become_matmul_and_add_with_the_same_outputs():
    import onnx
    import onnxruntime as ort
    sys.path.insert(0, str(ROOT / "bench"))
    import real_child

    from onnx import helper, numpy_helper
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
             for name, shape in (("b1", (6, 4)), ("c1", (6,)), ("b2", (6, 6)), ("b3", (6, 3)))]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "b1", "c1"], ["h"], name="g1", transB=1),
         helper.make_node("Gemm", ["h", "b2"], ["k"], name="g2", alpha=0.5),  # scaled: left as it is
         helper.make_node("Gemm", ["k", "b3"], ["y"], name="g3")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert real_child.gemms_to_matmuls(model) == 2
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "Gemm", "MatMul"]
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(before, after, atol=1e-5), np.abs(before - after).max()
