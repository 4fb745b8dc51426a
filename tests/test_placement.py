"""The placement facts (onnxflex/placement.py) against the ONNX schemas they come from, and the one
residual-skip rule that select (the plan) and the check rules (the emitted model) both apply."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, defs, helper

from onnxflex.placement import (BLOCKED_OPSET, FLOAT_TYPES, NUMPY_FLOAT_TYPES, PER_CHANNEL_OPSET,
                                QUANTIZABLE_TYPES, channel_axis, output_point, residual_skips, weight_axes)

FLOATS = {TensorProto.FLOAT: "float", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
          TensorProto.DOUBLE: "double"}


def _types(schema, param: str) -> set[str]:
    return {t for c in schema.type_constraints if c.type_param_str == param for t in c.allowed_type_strs}


def _first_opset_with(op: str, attribute: str) -> int:
    return min(v for v in range(1, defs.onnx_opset_version() + 1)
               if _has_schema(op, v) and attribute in defs.get_schema(op, v).attributes)


def _has_schema(op: str, version: int) -> bool:
    try:
        return defs.get_schema(op, version).since_version <= version
    except defs.SchemaError:
        return False


def test_float_sets_follow_the_quantize_schemas():
    q_reads = {t for t, name in FLOATS.items() if f"tensor({name})" in _types(defs.get_schema("QuantizeLinear"), "T1")}
    dq_writes = {t for t, name in FLOATS.items()
                 if f"tensor({name})" in _types(defs.get_schema("DequantizeLinear", 21), "T2")}
    assert set(QUANTIZABLE_TYPES) == q_reads == dq_writes, f"{QUANTIZABLE_TYPES} vs Q reads {q_reads}"
    assert set(FLOAT_TYPES) == set(FLOATS)
    numpy_floats = {t for t in FLOAT_TYPES if np.dtype(helper.tensor_dtype_to_np_dtype(t)).kind == "f"}
    assert set(NUMPY_FLOAT_TYPES) == numpy_floats


def test_opsets_are_where_dequantize_linear_gained_the_attribute():
    assert PER_CHANNEL_OPSET == _first_opset_with("DequantizeLinear", "axis")
    assert BLOCKED_OPSET == _first_opset_with("DequantizeLinear", "block_size")


@pytest.mark.parametrize("op, attrs, rank, axes, channel", [
    ("Conv", {}, 4, (0, 1), 0),
    ("ConvTranspose", {}, 4, (1, 0), 1),
    ("Gemm", {"transB": 1}, 2, (0, 1), 0),
    ("Gemm", {}, 2, (1, 0), 1),
    ("MatMul", {}, 2, (1, 0), 1),
    ("MatMul", {}, 3, (1, 0), None),
    ("Relu", {}, 2, (1, 0), None),
])
def test_weight_axes(op, attrs, rank, axes, channel):
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    assert weight_axes(node) == axes
    assert channel_axis(node, rank) == channel


def _nodes(text: str) -> list[onnx.NodeProto]:
    """``out = Op(a, b)`` lines as nodes named after their output."""
    nodes = []
    for line in text.strip().splitlines():
        out, call = (s.strip() for s in line.split("="))
        op, args = call.rstrip(")").split("(")
        nodes.append(helper.make_node(op, [a.strip() for a in args.split(",")], [out], name=out))
    return nodes


def test_residual_skip_is_the_input_other_than_the_latest_layer():
    nodes = _nodes("""
        a = Conv(x, w1)
        b = Conv(a, w2)
        s1 = Add(b, a)
        c = Conv(s1, w3)
        s2 = Add(a, c)
        s3 = Add(c, bias)
        s4 = Add(x, s3)
        s5 = Add(s4, a)
    """)
    skips = residual_skips(nodes, {"a", "b", "c"}, {"bias", "w1", "w2", "w3"})
    # s1, s2: a is the skip (b, c are later layers); s3 reads a constant; s4 joins no layer output;
    # s5: a is the only layer output, so s4 is the skip
    assert {k: v.name for k, v in skips.items()} == {"a": "s2", "s4": "s5"}
    assert list(residual_skips(nodes[:3], {"a", "b"}, ())) == ["a"]
    assert list(residual_skips(nodes, (), ())) == []


def test_output_point_stops_at_a_graph_output_and_at_a_second_reader():
    nodes = _nodes("""
        a = Conv(x, w)
        r = Relu(a)
        b = Conv(r, w)
        s = Sigmoid(b)
        t = Relu(b)
    """)
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
    assert output_point("a", users, ("Relu", "Clip")) == "r"
    assert output_point("a", users, ("Relu",), kept={"a"}) == "a", "a graph output is read as it is"
    assert output_point("a", users, ()) == "a"
    assert output_point("b", users, ("Relu", "Sigmoid")) == "b", "two readers: nothing is fused"
