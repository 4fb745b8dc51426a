"""Learning that diverges is undone, and a Sqrt of exact zeros (an STFT magnitude) does not make it diverge."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import onnxflex
import onnxflex.rounding.reconstruct as reconstruct
from onnxflex.config import QuantConfig
from onnxflex.rounding.converters import OpNode, find_converter


def sqrt_model() -> onnx.ModelProto:
    """x → Conv 'c1' (no bias) → y·y → Sqrt → Conv 'c2' → out: where x is 0, y is exactly 0 and so is
    the Sqrt's input, as in √(re² + im²) of a silent STFT bin."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["y", "y"], ["power"], name="power"),
             helper.make_node("Sqrt", ["power"], ["magnitude"], name="magnitude"),
             helper.make_node("Conv", ["magnitude", "w2"], ["out"], name="c2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 12, 12])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 12, 12])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def calibration() -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((48, 4, 12, 12)).astype(np.float32)
    x[:, :, :6] = 0.0  # the top half silent: c1's output is exactly 0 well inside it
    return {"x": x}


def test_the_sqrt_gradient_at_zero_is_zero():
    sqrt = find_converter("Sqrt", 13)
    node = OpNode("Sqrt", "s", ("x",), ("y",), 13)
    x = torch.tensor([0.0, 4.0, 0.25], requires_grad=True)
    (y,) = sqrt(node, [x])
    y.sum().backward()
    assert y.tolist() == [0.0, 2.0, 0.5]
    assert x.grad.tolist() == [0.0, 0.25, 1.0], x.grad


def test_a_block_through_a_sqrt_of_zeros_learns_with_finite_steps(caplog):
    """Without the zero gradient, c1's weights get 0 · inf = NaN in the first step, and learning ends
    at a NaN loss (and is undone)."""
    config = QuantConfig(method="flexround", wbits=4, iters=30, batch_size=16, verify_samples=0)
    with caplog.at_level("WARNING", logger="onnxflex"):
        result = onnxflex.quantize(sqrt_model(), calibration(), config, progress=False)
    assert "loss nan" not in caplog.text, caplog.text
    for block in result.report["blocks"]:
        assert block["iters"] == 30 and np.isfinite(block["loss_after"]), block


def test_a_learn_that_ends_in_nan_is_undone(monkeypatch, caplog):
    """Training poisoned to end with NaN parameters: learn() restores the start (the round-to-nearest
    weights and calibrated steps, bit for bit as an rtn run writes them), and warns."""
    real_train = reconstruct.train

    def diverging(module, *args, **kwargs):
        steps = real_train(module, *args, **kwargs)
        with torch.no_grad():
            for params, _ in module.learnable():
                for p in params:
                    p.fill_(float("nan"))
        return steps

    monkeypatch.setattr(reconstruct, "train", diverging)
    base = dict(wbits=4, iters=5, batch_size=16, verify_samples=0)
    with caplog.at_level("WARNING", logger="onnxflex"):
        learned = onnxflex.quantize(sqrt_model(), calibration(), QuantConfig(method="flexround", **base), progress=False)
    rtn = onnxflex.quantize(sqrt_model(), calibration(), QuantConfig(method="rtn", **base), progress=False)
    assert "not below its start nan" not in caplog.text and "learning ended at loss nan" in caplog.text, caplog.text
    for block in learned.report["blocks"]:
        assert block["loss_after"] == block["loss_before"], block
    arrays = {m: {i.name: numpy_helper.to_array(i) for i in r.model.graph.initializer}
              for m, r in (("flexround", learned), ("rtn", rtn))}
    assert arrays["flexround"].keys() == arrays["rtn"].keys()
    for name, value in arrays["rtn"].items():
        np.testing.assert_array_equal(arrays["flexround"][name], value, f"{name} differs from round-to-nearest")
