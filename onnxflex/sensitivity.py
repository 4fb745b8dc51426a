"""Per-layer weight sensitivity, measured on calibration data (the input of mixed precision).

For a quantized weight W_l and a width b, the sensitivity is the relative output error of the FP32
model when W_l alone is replaced by its round-to-nearest integers at b bits:

    s_l(b) = Σ_outputs Σ_samples ||f(x; W_l → RTN_b(W_l)) − f(x)||²  /  Σ_outputs Σ_samples ||f(x)||²

RTN_b is the rounder reconstruction starts from (same step search, per channel or per group), and
f runs in onnxruntime on the canonical model of the plan, whose layer weights are made overridable
graph inputs: one session, then one run per (weight, width), each feeding a single substituted
weight. Activations stay float, so the measure ranks the weights alone. Cost: (weights × widths + 1)
forward passes over at most SENSITIVITY_SAMPLES samples.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import onnx

from onnxflex.blocks import QuantLayer
from onnxflex.calib import CalibrationSet, fixed_batch
from onnxflex.device import torch_threads
from onnxflex.extdata import tensor_array
from onnxflex.ort import session

SENSITIVITY_SAMPLES = 64  # enough to rank layers on the bundled models; the cost grows linearly with it
BATCH = 64


def sensitivity_samples(data: CalibrationSet, model: onnx.ModelProto) -> CalibrationSet:
    """The first SENSITIVITY_SAMPLES samples of ``data`` (whole batches when the model fixes its batch)."""
    n = min(SENSITIVITY_SAMPLES, data.num_samples)
    fixed = fixed_batch(model)
    if fixed:
        n = max(fixed, n - n % fixed)
    return data.take(0, n)


def with_weight_inputs(model: onnx.ModelProto, weights: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose ``weights`` (initializer names) are also graph inputs, so that a run
    may feed a replacement for any of them and falls back to the stored value otherwise."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    listed = {i.name for i in out.graph.input}
    inits = {t.name: t for t in out.graph.initializer}
    for name in weights:
        if name not in listed:
            out.graph.input.append(onnx.helper.make_tensor_value_info(name, inits[name].data_type,
                                                                      list(inits[name].dims)))
            listed.add(name)
    return out


def rtn_weight(weight: np.ndarray, layer: QuantLayer, bits: int, scale_search: str) -> np.ndarray:
    """``weight`` quantized to ``bits`` by round-to-nearest and dequantized, in its own dtype."""
    import torch

    from onnxflex.rounding.methods import make_rounder

    # one weight is too small to share out, and on a busy machine waking a second intra-op thread for
    # each of the step search's roundings costs milliseconds apiece
    with torch_threads(1):
        rounder = make_rounder("rtn", torch.from_numpy(weight.astype(np.float32)), layer.axis, bits,
                               scale_search, layer.group_size)
        return rounder.export().dequantize().astype(weight.dtype)


def measure(model: onnx.ModelProto, layers: Mapping[str, QuantLayer], widths: Mapping[str, tuple[int, ...]],
            data: CalibrationSet, scale_search: str, providers, progress: Callable[[int], None] | None = None
            ) -> dict[str, dict[int, float]]:
    """Sensitivity s(b) of each weight in ``layers`` (weight name → one layer that reads it) at each
    width in ``widths[weight]``; returns {weight: {bits: relative output error}}. ``data`` are the
    model's inputs (all of them are run); float outputs are compared, others ignored."""
    runnable = with_weight_inputs(model, list(layers))
    sess = session(runnable, list(providers))
    outputs = [o.name for o in sess.get_outputs() if o.type in ("tensor(float)", "tensor(float16)",
                                                                "tensor(double)")]
    step = fixed_batch(model) or BATCH
    feeds = list(data.batches(step))
    reference = [[o.astype(np.float64) for o in sess.run(outputs, f)] for f in feeds]
    energy = max(sum(float(np.sum(o ** 2)) for ref in reference for o in ref), 1e-30)
    inits = {t.name: t for t in model.graph.initializer}
    result: dict[str, dict[int, float]] = {}
    done = 0
    for weight, layer in layers.items():
        original = tensor_array(inits[weight], model)
        result[weight] = {}
        for bits in widths[weight]:
            quantized = rtn_weight(original, layer, bits, scale_search)
            noise = 0.0
            for f, ref in zip(feeds, reference):
                got = sess.run(outputs, {**f, weight: quantized})
                noise += sum(float(np.sum((g.astype(np.float64) - r) ** 2)) for g, r in zip(got, ref))
            result[weight][bits] = noise / energy
            done += 1
            if progress is not None:
                progress(done)
    return result


__all__ = ["SENSITIVITY_SAMPLES", "measure", "rtn_weight", "sensitivity_samples", "with_weight_inputs"]
