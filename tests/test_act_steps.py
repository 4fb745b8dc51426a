"""Initial activation steps: the streamed percentile range, the default, and determinism."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnxflex
from onnxflex.config import ACT_SCALE_SEARCH, SCALE_SEARCH, QuantConfig, choices
from onnxflex.errors import ConfigError
from onnxflex.rounding.actrange import PointValues, tail_length


def nearest_rank(values: np.ndarray, p: float = 0.99999) -> float:
    """The ⌈p·n⌉-th smallest of ``values`` (numpy's 'inverted_cdf' percentile), 0 when empty."""
    return float(np.quantile(values, p, method="inverted_cdf")) if values.size else 0.0


def streamed(values: np.ndarray, batch: int) -> PointValues:
    pooled = PointValues(batches=-(-values.size // batch), keep_sample=False)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, values.size, batch):
        pooled.add("t", torch.from_numpy(values[start:start + batch]), 1, 1, gen)
    return pooled


@pytest.mark.parametrize("batch", [1 << 20, 37_000])
def test_the_percentile_range_is_each_sides_nearest_rank_percentile(batch):
    """Heavy-tailed values with a few outliers on each side, streamed in one batch or in uneven ones:
    the unsigned range is each side's 99.999th percentile, the signed one that of |x|, exactly."""
    rng = np.random.default_rng(0)
    values = rng.standard_t(3, 600_000).astype(np.float32)
    values[rng.integers(0, values.size, 9)] = [80, -90, 70, 60, -75, 95, 1e3, -2e3, 0]
    pooled = streamed(values, batch)
    lo, hi = pooled.percentile_range(signed=False)
    assert hi == nearest_rank(values[values > 0]), (hi, nearest_rank(values[values > 0]))
    assert -lo == nearest_rank(-values[values < 0]), (lo, nearest_rank(-values[values < 0]))
    assert hi < 1e3 and lo > -2e3, "the outliers were kept"
    edge = nearest_rank(np.abs(values))
    assert pooled.percentile_range(signed=True) == (-edge, edge)
    assert pooled.positive.top.size <= tail_length(values.size) + 1, "more values kept than the tail needs"


def test_a_small_tensor_and_a_one_sided_one_keep_their_extremes():
    """Below 100,000 values a side the percentile is the side's extreme; a side with no values ends at 0."""
    relu = np.abs(np.random.default_rng(1).standard_normal(50_000)).astype(np.float32)
    lo, hi = streamed(relu, 4096).percentile_range(signed=False)
    assert (lo, hi) == (0.0, float(relu.max())), (lo, hi)


def test_percentile_is_the_default_and_act_scale_has_its_own_choices():
    assert QuantConfig().act_scale == "percentile"
    assert choices()["act_scale"] == ACT_SCALE_SEARCH and "percentile" not in SCALE_SEARCH
    with pytest.raises(ConfigError, match="weight_scale='percentile'"):
        QuantConfig(weight_scale="percentile")


def conv_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 32, 32])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def input_scale(model: onnx.ModelProto) -> tuple[float, int]:
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return float(inits[q.input[1]]), int(inits[q.input[2]])


def test_an_outlier_leaves_the_percentile_step_alone_and_runs_repeat_byte_for_byte():
    """One value of 500 among 262,144 standard normals: min/max stretches the input's uint8 step over
    it, the percentile step is set by the rest; two percentile runs write the same bytes."""
    x = np.random.default_rng(3).standard_normal((64, 4, 32, 32)).astype(np.float32)
    x[5, 1, 2, 3] = 500.0
    runs = {}
    for scale in ("percentile", "percentile", "minmax"):
        config = QuantConfig(method="rtn", act_scale=scale, verify_samples=0)
        runs.setdefault(scale, []).append(onnxflex.quantize(conv_model(), {"x": x}, config, progress=False).model)
    s_minmax, _ = input_scale(runs["minmax"][0])
    s_pct, zp = input_scale(runs["percentile"][0])
    positive, negative = x[x > 0], -x[x < 0]
    expected = (nearest_rank(positive) + nearest_rank(negative)) / 255
    assert s_minmax == pytest.approx((500.0 + negative.max()) / 255, rel=1e-6), s_minmax
    assert s_pct == pytest.approx(expected, rel=1e-6), (s_pct, expected)
    assert s_pct < s_minmax / 50, f"percentile step {s_pct:.4g} vs min/max {s_minmax:.4g}"
    digests = {hashlib.sha256(m.SerializeToString()).hexdigest() for m in runs["percentile"]}
    assert len(digests) == 1, "two percentile runs wrote different models"


def sorted_tails(batches: list[tuple[str, np.ndarray]], count: int) -> dict[int, list[np.ndarray]]:
    """Each side's kept magnitudes after every batch, by a full sort of what was kept and the whole new
    batch (the bound as PointValues sizes it: ``count`` batches of the points' first sizes)."""
    sizes: dict[str, int] = {}
    kept = {1: np.empty(0, np.float32), -1: np.empty(0, np.float32)}
    history: dict[int, list[np.ndarray]] = {1: [], -1: []}
    for name, values in batches:
        sizes.setdefault(name, values.size)
        keep = tail_length(count * sum(sizes.values())) + 1
        for sign in kept:
            side = (values[values * sign > 0] * sign).astype(np.float32)
            kept[sign] = np.sort(np.concatenate([kept[sign], side]))[::-1][:keep]
            history[sign].append(kept[sign])
    return history


def value_sets(kind: str, rng: np.random.Generator) -> np.ndarray:
    """400,000 values of one kind: ties at the top, many zeros, one-sided, or heavy-tailed."""
    n = 400_000
    if kind == "ties":  # a handful of levels: the smallest kept value is tied with many new ones
        return rng.integers(-6, 7, n).astype(np.float32)
    if kind == "zeros":
        values = rng.standard_normal(n).astype(np.float32)
        values[rng.random(n) < 0.7] = 0.0
        return values
    if kind == "positive":
        return np.abs(rng.standard_t(3, n)).astype(np.float32) + 1e-3
    if kind == "negative":
        return -np.round(np.abs(rng.standard_t(3, n)) * 8).astype(np.float32) / 8 - 0.125
    return rng.standard_t(2, n).astype(np.float32)


BATCH_SIZES = [90_000, 61_000, 90_000, 1, 17, 89_999, 40_000, 28_983]  # first the largest; sums to 400,000


@pytest.mark.parametrize("kind", ["ties", "zeros", "positive", "negative", "heavy"])
def test_streamed_tails_are_the_largest_values_of_a_full_sort(kind):
    """Batches of uneven sizes: after every batch each side keeps exactly the multiset a full sort of
    what was kept plus the whole batch keeps, and the final ranges are the nearest-rank percentiles."""
    values = value_sets(kind, np.random.default_rng(4))
    bounds = np.cumsum([0] + BATCH_SIZES)
    batches = [("t", values[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    pooled = PointValues(batches=len(batches), keep_sample=False)
    expected = sorted_tails(batches, len(batches))
    gen = torch.Generator().manual_seed(0)
    for i, (name, chunk) in enumerate(batches):
        pooled.add(name, torch.from_numpy(chunk), 1, 1, gen)
        for sign, tails in ((1, pooled.positive), (-1, pooled.negative)):
            np.testing.assert_array_equal(tails.top, expected[sign][i], err_msg=f"side {sign}, batch {i}")
    positive, negative = values[values > 0], -values[values < 0]
    assert (pooled.positive.count, pooled.negative.count) == (positive.size, negative.size)
    assert pooled.percentile_range(signed=False) == (-nearest_rank(negative), nearest_rank(positive))
    edge = nearest_rank(np.abs(values))
    assert pooled.percentile_range(signed=True) == (-edge, edge)
    assert (pooled.lo, pooled.hi) == (float(values.min()), float(values.max()))


def test_pooled_points_keep_what_a_full_sort_keeps():
    """Two points sharing a quantizer, the second first seen after the first's batches began: the bound
    grows when it arrives, and the kept tails still match the full sort after every batch."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_t(3, 240_000).astype(np.float32), np.round(rng.standard_t(3, 300_000) * 4) / 4
    batches = [("a", a[:120_000]), ("b", b[:150_000].astype(np.float32)), ("a", a[120_000:]),
               ("b", b[150_000:].astype(np.float32))]
    pooled = PointValues(batches=2, keep_sample=False)
    expected = sorted_tails(batches, 2)
    gen = torch.Generator().manual_seed(0)
    for i, (name, chunk) in enumerate(batches):
        pooled.add(name, torch.from_numpy(chunk), 1, 1, gen)
        for sign, tails in ((1, pooled.positive), (-1, pooled.negative)):
            np.testing.assert_array_equal(tails.top, expected[sign][i], err_msg=f"side {sign}, batch {i}")


def test_a_full_side_sorts_only_the_values_beyond_its_floor(monkeypatch):
    """Once a side holds all its tail, a batch's values at or below the smallest kept one never reach the
    sort: the first batch selects from each side's values, later ones sort a few values per batch."""
    from onnxflex.rounding import actrange

    seen: list[int] = []
    largest = actrange._largest
    monkeypatch.setattr(actrange, "_largest", lambda v, k: seen.append(v.size) or largest(v, k))
    values = np.random.default_rng(6).standard_normal(1_000_000).astype(np.float32)
    streamed(values, 100_000)
    first = 4  # per side: the selection from the side's values, then the merge with the (empty) tails
    assert sorted(seen[:first])[-2] >= 40_000, seen
    assert sum(seen[first:]) < 1_000, f"values sorted after the first batch: {seen}"
