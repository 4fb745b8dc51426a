"""A conv net whose activations are large next to its weights, for the memory-vs-samples benchmark.

Six 3x3 convs with 32 channels at 32x32 (stride 1, ReLU), then global average pooling and a Gemm head:
about 60 k weights but 128 KiB per sample for every captured conv output.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHANNELS, SIZE, CONVS = 32, 32, 6
CAPTURED_BYTES_PER_SAMPLE = CONVS * CHANNELS * SIZE * SIZE * 4  # the conv outputs at block boundaries


def build_conv(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    nodes, inits, x, c_in = [], [], "x", 3
    for k in range(CONVS):
        w = (rng.standard_normal((CHANNELS, c_in, 3, 3)) * np.sqrt(2.0 / (c_in * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{k}_w"),
                  numpy_helper.from_array((rng.standard_normal(CHANNELS) * 0.1).astype(np.float32), f"conv{k}_b")]
        nodes += [helper.make_node("Conv", [x, f"conv{k}_w", f"conv{k}_b"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}")]
        x, c_in = f"r{k}", CHANNELS
    inits += [numpy_helper.from_array((rng.standard_normal((10, CHANNELS)) * 0.2).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "wide_activation_cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxflex-bench")
    model.ir_version = 8
    onnx.save(model, path)
    return path
