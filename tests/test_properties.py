"""Property tests (hypothesis) for the quantization math: round-to-nearest error bounds, INT4
packing against onnx's own, per-channel and blocked scale shapes, and FlexRound's export matching its
fake-quant forward. Example counts are kept small so the file runs in seconds."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxflex.emit.pack import blocked_scale_shape, int4_initializer, pack_int4, unpack_int4
from onnxflex.qparams import channel_shape
from onnxflex.rounding.quant import signed_range
from onnxflex.rounding.rounders import FlexRounder, RTNRounder, init_weight_scale

# derandomize: CI runs the same examples on every run
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# weight shape and the output-channel axis the selector would give it
WEIGHT_LAYOUTS = st.sampled_from([
    ((4, 3, 3, 3), 0),  # Conv
    ((3, 5, 2, 2), 1),  # ConvTranspose
    ((6, 5), 0),  # Gemm transB=1
    ((5, 6), 1),  # Gemm transB=0 / MatMul
    ((7,), 0),  # a vector: one channel per element
])


@st.composite
def weights(draw, elements=st.floats(-8.0, 8.0, width=32, allow_subnormal=False)):
    """(float32 weight, axis) with at least one non-zero value per output channel."""
    shape, axis = draw(WEIGHT_LAYOUTS)
    w = draw(hnp.arrays(np.float32, shape, elements=elements))
    w = np.where(np.abs(w) < 1e-3, np.float32(0.5), w)  # steps of 1e-12 channels are another test
    return torch.from_numpy(np.ascontiguousarray(w)), axis


# --- round to nearest ---------------------------------------------------------------------------------


@SETTINGS
@given(weights(), st.integers(2, 8), st.sampled_from(["minmax", "mse"]))
def test_rtn_error_is_at_most_half_a_step_inside_the_clip_range(wa, bits, search):
    w, axis = wa
    r = RTNRounder(w, axis, bits, search)
    step = r.scale().reshape(r.shape)
    qmin, qmax = signed_range(bits)
    err = (r.fake_quant() - w).abs()
    slack = 1e-6 * -qmin * step.expand_as(w)  # float32 rounding of the step, times up to |qmin| steps
    inside = (w >= qmin * step - slack) & (w <= qmax * step + slack)
    assert torch.all(err[inside] <= (step / 2).expand_as(w)[inside] + slack[inside]), \
        f"max error {float((err / step)[inside].max()):.4f} steps > 0.5 ({bits} bits, {search})"
    clipped = r.integers()[~inside]
    assert torch.all((clipped == qmin) | (clipped == qmax)), "a value outside the range did not clip to its end"
    if search == "minmax":
        assert bool(inside.all()), "min/max steps must cover every value"


@SETTINGS
@given(weights(), st.integers(2, 8))
def test_rtn_export_dequantizes_to_its_fake_quant(wa, bits):
    w, axis = wa
    r = RTNRounder(w, axis, bits, "mse")
    qw = r.export()
    qmin, qmax = signed_range(bits)
    assert qw.ints.dtype == np.int8 and qmin <= qw.ints.min() and qw.ints.max() <= qmax
    np.testing.assert_array_equal(qw.dequantize(), r.fake_quant().numpy())


# --- per-channel and blocked shapes -------------------------------------------------------------------


@SETTINGS
@given(weights(), st.integers(2, 8), st.sampled_from(["minmax", "mse"]))
def test_per_channel_scale_shapes(wa, bits, search):
    w, axis = wa
    channels = w.shape[axis]
    scale = init_weight_scale(w, axis, bits, search)
    assert tuple(scale.shape) == (channels,) and bool((scale > 0).all())
    shape = channel_shape(w.ndim, axis)
    assert len(shape) == w.ndim and shape[axis] == -1 and all(d == 1 for k, d in enumerate(shape) if k != axis)
    assert scale.reshape(shape).expand_as(w).shape == w.shape
    qw = RTNRounder(w, axis, bits, search).export()
    assert qw.ints.shape == tuple(w.shape) and qw.scale.shape == (channels,) and qw.zero_point.shape == (channels,)
    assert qw.scale.dtype == np.float32 and qw.zero_point.dtype == np.int8 and not qw.zero_point.any()


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 8), st.integers(0, 1), st.data())
def test_blocked_scale_shape_is_what_dequantize_linear_accepts(rows, cols, block, axis, data):
    """onnx's reference DequantizeLinear (opset 21) takes a scale of blocked_scale_shape and repeats
    each step over its block along ``axis``."""
    shape = (rows, cols)
    sshape = blocked_scale_shape(shape, axis, block)
    assert sshape[1 - axis] == shape[1 - axis] and sshape[axis] == -(-shape[axis] // block)
    x = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(-8, 7)))
    scale = data.draw(hnp.arrays(np.float32, sshape, elements=st.floats(0.125, 2.0, width=32)))
    node = helper.make_node("DequantizeLinear", ["x", "s"], ["y"], axis=axis, block_size=block)
    graph = helper.make_graph([node], "dq", [helper.make_tensor_value_info("x", TensorProto.INT8, shape),
                                             helper.make_tensor_value_info("s", TensorProto.FLOAT, sshape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    y = ReferenceEvaluator(model).run(None, {"x": x, "s": scale})[0]
    expected = x.astype(np.float32) * np.repeat(scale, block, axis=axis)[:rows, :cols]
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_blocked_scale_shape_rejects_a_zero_block():
    with pytest.raises(ValueError, match="block_size must be at least 1"):
        blocked_scale_shape((4, 4), 0, 0)


# --- INT4 packing -------------------------------------------------------------------------------------


def int4_values(signed: bool, max_side: int = 7):
    lo, hi = (-8, 7) if signed else (0, 15)
    return hnp.arrays(np.int8 if signed else np.uint8,
                      hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=max_side),
                      elements=st.integers(lo, hi))


@SETTINGS
@given(st.data(), st.booleans())
def test_int4_pack_unpack_round_trip(data, signed):
    values = data.draw(int4_values(signed))
    packed = pack_int4(values, signed)
    assert packed.dtype == np.uint8 and packed.size == (values.size + 1) // 2
    back = unpack_int4(packed, values.size, signed)
    assert back.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(back.reshape(values.shape), values)


@SETTINGS
@given(st.data(), st.booleans())
def test_int4_packing_matches_onnx(data, signed):
    """Our bytes are onnx's bytes for an ml_dtypes int4/uint4 array, and both read back alike."""
    values = data.draw(int4_values(signed))
    ml_type = ml_dtypes.int4 if signed else ml_dtypes.uint4
    theirs = numpy_helper.from_array(values.astype(ml_type), "w")
    ours = int4_initializer(values, "w", signed)
    assert ours.data_type == theirs.data_type == (TensorProto.INT4 if signed else TensorProto.UINT4)
    assert list(ours.dims) == list(theirs.dims) == list(values.shape)
    assert ours.raw_data == theirs.raw_data
    np.testing.assert_array_equal(numpy_helper.to_array(ours).astype(np.int8 if signed else np.uint8), values)
    np.testing.assert_array_equal(
        unpack_int4(np.frombuffer(theirs.raw_data, np.uint8), values.size, signed).reshape(values.shape), values)


def test_int4_layout_first_value_in_the_low_nibble():
    assert pack_int4(np.array([1, -2, 7]), signed=True).tolist() == [0xE1, 0x07]
    assert pack_int4(np.array([15, 0, 9, 3]), signed=False).tolist() == [0x0F, 0x39]


@pytest.mark.parametrize("values, signed", [([8], True), ([-9], True), ([16], False), ([-1], False)])
def test_int4_pack_rejects_out_of_range(values, signed):
    with pytest.raises(ValueError, match="4-bit values must lie in"):
        pack_int4(np.array(values), signed)


def test_int4_pack_rejects_fractions_and_unpack_wrong_sizes():
    with pytest.raises(ValueError, match="takes integers"):
        pack_int4(np.array([0.5]), signed=True)
    with pytest.raises(ValueError, match="3 4-bit values take 2 bytes, got 1"):
        unpack_int4(np.zeros(1, np.uint8), 3, signed=True)


# --- FlexRound ----------------------------------------------------------------------------------------


@SETTINGS
@given(weights(), st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_flexround_export_equals_its_fake_quant(wa, bits, seed):
    """With any learned deltas, the exported integers × scale reproduce the fake-quant forward (the
    element-wise divisors vanish at export), and the integers stay on the grid."""
    w, axis = wa
    r = FlexRounder(w, axis, bits, "mse")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (r.delta1, r.delta2, r.delta3, r.delta4):
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    qw = r.export()
    qmin, qmax = signed_range(bits)
    assert qmin <= qw.ints.min() and qw.ints.max() <= qmax
    forward = r.fake_quant().detach().numpy()
    step = qw.scale.reshape(channel_shape(w.ndim, axis))
    # round_ste computes x + (round(x) - x), which can miss round(x) by an ulp of x
    np.testing.assert_allclose(qw.dequantize(), forward, rtol=0, atol=float(np.max(step)) * 1e-5)
    np.testing.assert_array_equal(np.round(forward / step).astype(np.int8), qw.ints)


@SETTINGS
@given(weights(), st.integers(2, 8))
def test_flexround_starts_as_rtn(wa, bits):
    w, axis = wa
    flex, rtn = FlexRounder(w, axis, bits, "mse"), RTNRounder(w, axis, bits, "mse")
    np.testing.assert_array_equal(flex.export().ints, rtn.export().ints)
    np.testing.assert_array_equal(flex.fake_quant().detach().numpy(), rtn.fake_quant().numpy())
