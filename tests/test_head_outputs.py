"""A head's output (a weighted op whose output reaches the graph outputs through float ops only) whose
calibrated values never crossed zero gets a range mirrored about zero, so the decision the calibration
data never showed (a speech frame, a positive class) is not clipped at the threshold."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

import onnxflex
from helpers import run_model
from onnxflex.config import QuantConfig
from onnxflex.options import resolve
from onnxflex.placement import final_tensors
from onnxflex.planning import build_plan

HEAD = """
<ir_version: 8, opset_import: ["" : 13]>
head (float[N, 64, 4, 4] x) => (float[N, 1, 4, 4] y) {
    h = Conv (x, w1, b1)
    r = Relu (h)
    logit = Conv (r, w2, b2)
    y = Sigmoid (logit)
}"""


def _head_model(relu_head: bool = False) -> onnx.ModelProto:
    """Two 1x1 convs: 16 hidden channels average x's first 32 channels (a), 16 its last 32 (b); the
    head's logit is mean(a) - 1.5 mean(b) - 0.1 (through a Relu when ``relu_head``), then a Sigmoid."""
    text = HEAD.replace("y = Sigmoid (logit)", "q = Relu (logit)\n    y = Sigmoid (q)") if relu_head else HEAD
    model = onnx.parser.parse_model(text)
    w1 = np.zeros((32, 64, 1, 1), np.float32)
    w1[:16, :32] = w1[16:, 32:] = 1 / 32
    w2 = np.concatenate([np.full(16, 1 / 16), np.full(16, -1.5 / 16)]).astype(np.float32).reshape(1, 32, 1, 1)
    for name, value in (("w1", w1), ("b1", np.zeros(32, np.float32)), ("w2", w2), ("b2", np.array([-0.1], np.float32))):
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(n: int, b_share: float, seed: int) -> dict[str, np.ndarray]:
    """x with its first 32 channels a ~ U(0, 1) per pixel and its last 32 ``b_share`` · a."""
    a = np.random.default_rng(seed).uniform(0, 1, (n, 1, 4, 4)).astype(np.float32)
    return {"x": np.concatenate([np.repeat(a, 32, 1), np.repeat(b_share * a, 32, 1)], axis=1)}


def _output_range(model: onnx.ModelProto, tensor: str) -> tuple[float, float]:
    """(lo, hi) of the uint8 QuantizeLinear that reads ``tensor`` in an emitted model."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    scale, zero = float(inits[q.input[1]]), int(inits[q.input[2]])
    return -zero * scale, (255 - zero) * scale


def test_final_tensors_stop_at_any_later_layer_also_inside_a_branch():
    model = _head_model()
    final = final_tensors(model.graph)
    assert {"logit", "y"} <= final and not {"x", "h", "r"} & final, final
    then = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["logit", "w3"], ["z"])], "then", [],
                                  [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w3")])
    other = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["y"], ["z2"])], "else", [],
                                   [onnx.helper.make_tensor_value_info("z2", onnx.TensorProto.FLOAT, None)])
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.node.append(onnx.helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=other))
    assert "logit" not in final_tensors(graph), "a Conv inside an If branch reads logit: no final tensor"
    assert "out" in final_tensors(graph)


def test_plan_names_the_head_output_and_only_it():
    plan = build_plan(_head_model(), resolve(QuantConfig(method="rtn")).plan)
    assert plan.head_points == ("logit",), plan.head_points
    assert {"x", "r", "logit"} == set(plan.act_points), plan.act_points


def test_one_sided_head_is_mirrored_and_keeps_the_unseen_decision():
    model = _head_model()
    calib = _inputs(64, 1.0, seed=1)  # logit = -0.5 a - 0.1 < 0: the calibration never shows y > 0.5
    result = onnxflex.quantize(model, calib, QuantConfig(method="rtn", verify_samples=0), progress=False)
    lo, hi = _output_range(result.model, "logit")
    (fp_calib,) = run_model(model, calib)
    seen = float(-np.log(1 / fp_calib.min() - 1))  # the most negative calibrated logit
    assert hi >= -seen * 0.99 and lo <= seen * 0.99, f"head range [{lo:.3f}, {hi:.3f}] is not mirrored ({seen:.3f})"
    feeds = _inputs(64, 0.1, seed=2)  # logit = 0.85 a - 0.1: mostly positive
    (fp,) = run_model(model, feeds)
    (got,) = run_model(result.model, feeds)
    agree = float(((got > 0.5) == (fp > 0.5)).mean())
    assert (fp > 0.5).mean() > 0.5
    assert agree >= 0.97, f"decisions agree on {agree:.3f} of the pixels (< 0.97)"
    hidden_lo, _ = _output_range(result.model, "r")
    assert hidden_lo == 0.0, f"the hidden Relu output (not a head) got lo {hidden_lo}"


def test_head_behind_a_relu_keeps_its_one_sided_range():
    model = _head_model(relu_head=True)
    calib = _inputs(64, 0.1, seed=1)  # positive logits: the Relu output is >= 0 by construction
    result = onnxflex.quantize(model, calib, QuantConfig(method="rtn", verify_samples=0), progress=False)
    lo, hi = _output_range(result.model, "q")
    assert lo == 0.0 and hi > 0.5, f"a Relu head's range [{lo}, {hi}] should start at 0"
