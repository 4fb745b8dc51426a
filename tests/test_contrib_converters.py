"""Converters of onnxruntime's own ops (onnxflex/rounding/converters/contrib.py) against onnxruntime's CPU
kernels on seeded random inputs: SimplifiedLayerNormalization (default domain),
com.microsoft SkipSimplifiedLayerNormalization (all four outputs) and GroupQueryAttention (packed and
separate q/k/v, rotary half-split and interleaved, softcap, an empty and a non-empty past), and the
cases GroupQueryAttention's converter refuses.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from onnxflex.errors import RegistryError
from onnxflex.rounding.converters import OpNode, converter, find_converter, supported_ops

RNG = np.random.default_rng(0)
MS = "com.microsoft"
HEADS, KV_HEADS, HEAD = 4, 2, 16  # onnxruntime takes head sizes that are multiples of 16


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def one_node(op: str, inputs: dict[str, np.ndarray | None], outputs: int, domain: str = "", **attrs):
    """(node, feeds): ``None`` inputs are omitted ("" in the node's input list)."""
    names = [name if value is not None else "" for name, value in inputs.items()]
    node = helper.make_node(op, names, [f"y{i}" for i in range(outputs)], name=f"{op}_0", domain=domain, **attrs)
    return node, {name: value for name, value in inputs.items() if value is not None}


def onnxruntime_outputs(node, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    value_infos = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                   for name, a in feeds.items()]
    graph = helper.make_graph([node], "one_node", value_infos,
                              [helper.make_empty_tensor_value_info(o) for o in node.output])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 22),
                                                                    helper.make_opsetid(MS, 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def converter_outputs(node, feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    fn = find_converter(node.op_type, 22, node.domain)
    assert fn is not None, f"no converter for {node.domain}:{node.op_type}"
    return fn(OpNode.from_proto(node, 22), [torch.from_numpy(feeds[i]) if i else None for i in node.input])


def assert_matches(node, feeds: dict[str, np.ndarray], tol: float = 2e-5) -> None:
    expected, got = onnxruntime_outputs(node, feeds), converter_outputs(node, feeds)
    assert len(got) == len(expected), f"{len(got)} outputs, onnxruntime gives {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        g = g.detach().numpy()
        assert g.shape == e.shape and g.dtype == e.dtype, f"output {i}: {g.shape} {g.dtype} vs {e.shape} {e.dtype}"
        worst = float(np.abs(g - e).max()) if e.size else 0.0
        assert worst <= tol * max(1.0, float(np.abs(e).max(initial=0))), f"output {i}: off by {worst:.3g}"


@pytest.mark.parametrize("axis, outputs", [(-1, 1), (-1, 2), (1, 2), (-2, 1)])
def test_simplified_layer_norm_matches_onnxruntime(axis, outputs):
    x = f32(2, 3, 8) * 3
    gamma = f32(*x.shape[axis % 3:])
    node, feeds = one_node("SimplifiedLayerNormalization", {"x": x, "gamma": gamma}, outputs, axis=axis,
                           epsilon=1e-3)
    assert_matches(node, feeds)


@pytest.mark.parametrize("bias, outputs", [(True, 4), (False, 4), (True, 1), (False, 2)])
def test_skip_simplified_layer_norm_matches_onnxruntime_on_every_output(bias, outputs):
    inputs = {"x": f32(2, 5, 16) * 2, "skip": f32(2, 5, 16), "gamma": f32(16), "bias": f32(16) if bias else None}
    if not bias:
        del inputs["bias"]
    node, feeds = one_node("SkipSimplifiedLayerNormalization", inputs, outputs, domain=MS, epsilon=1e-5)
    assert_matches(node, feeds)


def gqa(batch: int, new: int, past: int, packed: bool = True, seqlens: list[int] | None = None, **attrs):
    """A GroupQueryAttention node and feeds: ``new`` tokens after ``past`` cached ones, rotary caches
    of 32 positions (rotary over the whole head)."""
    total = past + new
    q, k, v = f32(batch, new, HEADS * HEAD), f32(batch, new, KV_HEADS * HEAD), f32(batch, new, KV_HEADS * HEAD)
    angles = np.arange(32)[:, None] * (10000.0 ** (-np.arange(HEAD // 2) / (HEAD // 2)))[None]
    inputs = {"query": np.concatenate([q, k, v], -1) if packed else q, "key": None if packed else k,
              "value": None if packed else v, "past_key": f32(batch, KV_HEADS, past, HEAD),
              "past_value": f32(batch, KV_HEADS, past, HEAD),
              "seqlens_k": np.array(seqlens or [total - 1] * batch, np.int32),
              "total_sequence_length": np.array([total], np.int32),
              "cos_cache": np.cos(angles).astype(np.float32), "sin_cache": np.sin(angles).astype(np.float32)}
    attrs = {"num_heads": HEADS, "kv_num_heads": KV_HEADS, "do_rotary": 1, **attrs}
    return one_node("GroupQueryAttention", inputs, 3, domain=MS, **attrs)


@pytest.mark.parametrize("batch, new, past, packed, attrs", [
    (2, 6, 0, True, {"scale": 0.3}),
    (2, 6, 0, False, {}),
    (2, 1, 7, True, {"scale": 0.3}),
    (1, 4, 5, True, {}),
    (2, 1, 5, False, {"rotary_interleaved": 1}),
    (1, 5, 0, True, {"rotary_interleaved": 1, "softcap": 2.0}),
    (2, 3, 0, True, {"do_rotary": 0}),
    (2, 1, 4, True, {"do_rotary": 0}),
], ids=["prompt-packed", "prompt-separate", "step-after-past", "tokens-after-past", "interleaved-step",
        "interleaved-softcap", "no-rotary-prompt", "no-rotary-step"])
def test_group_query_attention_matches_onnxruntime(batch, new, past, packed, attrs):
    node, feeds = gqa(batch, new, past, packed, **attrs)
    assert_matches(node, feeds)


@pytest.mark.parametrize("case, attrs, match", [
    ({"seqlens": [6, 3]}, {}, "seqlens_k"),  # a padded batch: the second row has 4 real tokens
    ({}, {"local_window_size": 3}, "local_window_size"),
], ids=["padded-batch", "sliding-window"])
def test_group_query_attention_refuses_what_it_does_not_compute(case, attrs, match):
    node, feeds = gqa(2, 7, 0, **case, **attrs)
    with pytest.raises(NotImplementedError, match=match):
        converter_outputs(node, feeds)


def test_every_contrib_converter_has_a_case():
    assert supported_ops(MS) == ["GroupQueryAttention", "SkipSimplifiedLayerNormalization"]
    assert "SimplifiedLayerNormalization" in supported_ops()
    assert "GroupQueryAttention" not in supported_ops() and find_converter("GroupQueryAttention", 22) is None


def test_a_converter_for_another_domain_is_refused():
    with pytest.raises(RegistryError, match="ai.onnx.ml"):
        converter("TreeEnsemble", domain="ai.onnx.ml")
    assert find_converter("GroupQueryAttention", 22, "ai.onnx.ml") is None
