"""With --abits 8 a decoder's key/value cache keeps the float output of the k/v projections: no Q/DQ on
any tensor a present output stores (passes/kv_cache.cache_sources), on both decoder forms (torch.onnx's
Concat of past and new keys, and onnxruntime-genai's GroupQueryAttention), while those projections
still run as integer kernels (MatMulIntegerToFloat) and every other layer keeps its output Q/DQ."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import parser

from helpers import MODELS
from onnxflex import QuantConfig, quantize
from onnxflex.passes.kv_cache import cache_sources
from onnxflex.placement import LATER_LAYER_OPS
from onnxflex.verify import optimized_op_counts

FORMS = {"torch_onnx": MODELS / "decoder" / "decoder.onnx", "genai": MODELS / "decoder" / "genai" / "model.onnx"}
STOP = set(LATER_LAYER_OPS) | {"QLinearMatMul", "MatMulNBits"}


def w8a8(form: str, tmp_path) -> onnx.ModelProto:
    calib = dict(np.load(MODELS / "decoder" / "decoder.calib.npz"))
    if form == "genai":
        del calib["position_ids"]  # the builder's model takes none: GroupQueryAttention counts positions
    path = tmp_path / "calib.npz"
    np.savez(path, **calib)
    config = QuantConfig(wbits=8, abits=8, method="rtn", calib_samples=32, verify_samples=8, seed=0)
    return quantize(str(FORMS[form]), str(path), config, progress=False).model


def stored_producers(model: onnx.ModelProto) -> list[str]:
    """Op types of the nodes whose values each present output stores, walked back to the weighted ops."""
    found = cache_sources(model, STOP)
    return [node.op_type for node in model.graph.node if any(o in found for o in node.output)]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_cache_stores_float_projection_outputs_at_w8a8(form, tmp_path):
    model = w8a8(form, tmp_path)
    producers = stored_producers(model)
    assert producers.count("MatMul") == (2 if form == "genai" else 4), producers  # packed qkv, or k and v per layer
    assert "DequantizeLinear" not in producers and "QuantizeLinear" not in producers, producers
    kernels = optimized_op_counts(model)
    assert kernels.get("MatMulIntegerToFloat") == (2 if form == "genai" else 4), kernels
    assert kernels.get("QLinearMatMul", 0) >= 9, kernels  # the other layers keep their output Q/DQ


def test_cache_sources_stop_at_shapes_weighted_ops_and_the_query_of_group_query_attention():
    model = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[1, 4, 8] x, float[1, 2, 0, 4] past_k, float[1, 2, 0, 4] past_v, int32[1] seqlens, int32 total)
          => (float[1, 4, 8] y, float[1, 2, 4, 4] present_k, float[1, 2, 4, 4] present_v)
          <float[8, 8] wq, float[8, 8] wk, float[8, 8] wv> {
            h = Relu (x)
            q = MatMul (h, wq)
            k0 = MatMul (h, wk)
            shape = Shape (h)
            k = Reshape (k0, shape)
            v = MatMul (h, wv)
            y, present_k, present_v = com.microsoft.GroupQueryAttention <num_heads = 2, kv_num_heads = 2>
                (q, k, v, past_k, past_v, seqlens, total)
        }""")
    found = cache_sources(model, STOP)
    assert {"k0", "k", "v"} <= found, found
    assert not {"h", "x", "q"} & found, found  # Shape reads h's shape only; the query is not cached
