"""The tensor store between capture and reconstruction: typed keys, the block accessors, the RAM bound."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from onnxflex.blocks import Block
from onnxflex.cache import DiskArray, Key, Run, TensorCache
from onnxflex.layout import Layout

BLOCK = Block("b0", ("conv",), inputs=("x", "rate"), outputs=("y",), layers=())


def filled(max_bytes: int, seed: int = 0) -> tuple[TensorCache, dict[str, np.ndarray]]:
    """A cache holding the FP run of BLOCK's tensors over 6 samples, written 4 then 2 samples at a time
    (as capture writes batches); ``rate`` is shared (one value for every sample)."""
    rng = np.random.default_rng(seed)
    values = {"x": rng.standard_normal((6, 3, 2)).astype(np.float32),
              "y": rng.standard_normal((6, 5)).astype(np.float32), "rate": np.float32(16000.0)}
    cache = TensorCache(max_bytes)
    cache.record(Layout({"rate": None}), 6)
    for start, stop in ((0, 4), (4, 6)):
        for name in ("x", "y"):
            cache.write(Key.fp(name), start, values[name][start:stop])
        cache.write(Key.fp("rate"), start, np.asarray(values["rate"] + start))  # a later batch is not kept
    return cache, values


def test_keys_are_typed_and_name_the_run():
    assert Key.fp("x") == Key(Run.FP, "x") and Key.q("x") == Key(Run.Q, "x")
    assert Key.fp("x") != Key.q("x") and len({Key.fp("x"), Key.q("x"), Key.fp("x")}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        Key.fp("x").tensor = "y"
    cache, _ = filled(1 << 20)
    assert Key.fp("x") in cache and Key.q("x") not in cache and "fp:x" not in cache
    cache.close()


@pytest.mark.parametrize("max_bytes", [1 << 20, 0], ids=["ram", "spilled"])
def test_accessors_give_the_block_tensors_as_written(max_bytes):
    cache, values = filled(max_bytes)
    try:
        assert cache.spilled == (max_bytes == 0)
        fp_in, fp_out = cache.fp_inputs(BLOCK), cache.fp_outputs(BLOCK)
        assert list(fp_in) == ["x", "rate"] and list(fp_out) == ["y"]
        kind = DiskArray if max_bytes == 0 else np.ndarray
        assert isinstance(fp_in["x"], kind) and isinstance(fp_out["y"], kind)
        np.testing.assert_array_equal(np.asarray(fp_in["x"]), values["x"])
        np.testing.assert_array_equal(np.asarray(fp_out["y"]), values["y"])
        assert float(np.asarray(fp_in["rate"])) == 16000.0, "a shared tensor keeps its first batch's value"
    finally:
        cache.close()


def test_q_inputs_fall_back_to_the_fp_entry_itself():
    cache, values = filled(1 << 20)
    try:
        q_x = values["x"] * 0.5
        cache.write(Key.q("x"), 0, q_x)
        q_in, fp_in = cache.q_inputs(BLOCK), cache.fp_inputs(BLOCK)
        np.testing.assert_array_equal(q_in["x"], q_x)
        np.testing.assert_array_equal(cache.fp_inputs(BLOCK)["x"], values["x"])
        assert q_in["rate"] is fp_in["rate"], "an input without a quantized value is the FP entry, not a copy"
    finally:
        cache.close()


def test_ram_bound_spills_what_does_not_fit_and_close_removes_the_files():
    x_bytes = 6 * 3 * 2 * 4
    cache, values = filled(x_bytes)  # x fits, y (written next) spills
    folder = Path(cache[Key.fp("y")].path).parent
    assert isinstance(cache[Key.fp("x")], np.ndarray) and isinstance(cache[Key.fp("y")], DiskArray)
    assert isinstance(cache[Key.fp("rate")], np.ndarray), "a 0-d value stays in RAM past the bound"
    assert cache.ram_bytes == x_bytes + 4 and folder.is_dir()
    np.testing.assert_array_equal(cache[Key.fp("y")][np.array([5, 0])], values["y"][[5, 0]])
    cache.close()
    assert not folder.exists() and not cache.spilled and Key.fp("x") not in cache


def test_a_rewrite_from_sample_zero_replaces_the_entry():
    cache, _ = filled(0)
    try:
        cache.write(Key.fp("y"), 0, np.ones((6, 5), np.float32))
        np.testing.assert_array_equal(np.asarray(cache[Key.fp("y")]), np.ones((6, 5), np.float32))
    finally:
        cache.close()


def test_release_drops_both_runs_of_a_tensor_and_frees_its_ram():
    x_bytes = 6 * 3 * 2 * 4
    cache, values = filled(x_bytes)  # x in RAM, y spilled
    try:
        held = cache[Key.fp("x")]
        cache.write(Key.q("x"), 0, values["x"] + 1)  # past the bound: spilled
        spilled = cache[Key.q("x")]
        cache.release(["x", "absent"])
        assert Key.fp("x") not in cache and Key.q("x") not in cache, "both runs of x are dropped"
        assert cache.ram_bytes == 4, f"{cache.ram_bytes} RAM bytes left, only the 0-d rate's 4 should be"
        np.testing.assert_array_equal(np.asarray(spilled), values["x"] + 1)  # a holder still reads it
        np.testing.assert_array_equal(held, values["x"])
        np.testing.assert_array_equal(np.asarray(cache[Key.fp("y")]), values["y"])
        cache.write(Key.q("y"), 0, values["y"])  # the freed RAM takes the next entry
        assert isinstance(cache[Key.q("y")], np.ndarray), "the released RAM counts free again"
    finally:
        cache.close()


def test_dead_after_names_each_tensor_at_the_last_block_that_reads_or_writes_it():
    import onnx

    from onnxflex.blocks import BlockPlan
    from onnxflex.rounding.reconstruct import dead_after

    blocks = (Block("b0", ("n0",), inputs=("x",), outputs=("a", "skip"), layers=()),
              Block("b1", ("n1",), inputs=("a",), outputs=("b",), layers=()),
              Block("b2", ("n2",), inputs=("b", "skip"), outputs=("y",), layers=()))
    dead = dead_after(BlockPlan(onnx.ModelProto(), blocks))
    assert [sorted(names) for names in dead] == [["x"], ["a"], ["b", "skip", "y"]], dead


def test_hold_keeps_the_array_itself_within_the_ram_bound():
    cache = TensorCache(max_bytes=1000)
    cache.record(Layout(), 10)
    x = np.arange(40, dtype=np.float32).reshape(10, 4)  # 160 bytes
    assert cache.hold(Key.fp("x"), x)
    assert cache[Key.fp("x")] is x and cache.ram_bytes == x.nbytes
    big = np.zeros((10, 100), np.float32)  # 4000 bytes: past the bound, the caller writes it instead
    assert not cache.hold(Key.fp("big"), big) and Key.fp("big") not in cache and cache.ram_bytes == x.nbytes
    cache.release(["x"])
    assert cache.ram_bytes == 0


def test_capture_keeps_a_graph_input_as_its_calibration_array_and_stores_the_same_values():
    """A graph input with samples on dim 0 is the calibration array itself, not a copy onnxruntime made;
    the other boundary tensors are as the run computes them, with or without that shortcut."""
    import onnx
    from onnx import TensorProto, helper

    from onnxflex.calib import CalibrationSet
    from onnxflex.capture import capture

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    data = CalibrationSet({"x": x}, "test")
    cache = TensorCache(1 << 20)
    capture(model, ["x", "r"], data, cache, ["CPUExecutionProvider"], batch=4)
    assert np.shares_memory(cache[Key.fp("x")], x), "the graph input must be the calibration array, not a copy"
    assert np.array_equal(cache[Key.fp("x")], x)
    assert np.array_equal(cache[Key.fp("r")], np.maximum(x, 0))
    small = TensorCache(x.nbytes - 1)  # x does not fit: written (and spilled) as before
    capture(model, ["x", "r"], data, small, ["CPUExecutionProvider"], batch=4)
    assert not isinstance(small[Key.fp("x")], np.ndarray) and np.array_equal(np.asarray(small[Key.fp("x")]), x)
    small.close()
