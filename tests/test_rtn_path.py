"""A method that learns nothing (rtn, hqq) runs the quantized path on UNLEARNED_LOSS_SAMPLES samples only:
it only reports the block losses and feeds the next blocks' quantized inputs, so what is emitted is the
model a run over every sample emits, byte for byte."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphs  # tests/graphs.py; tests/ is on pytest's pythonpath
import onnxflex
from onnxflex.cache import Run, TensorCache
from onnxflex.report import summary
from onnxflex.rounding import reconstruct

CALIB = 48  # 36 reconstruct, 12 held out for verification


def branchy_model() -> onnx.ModelProto:
    """conv1 → Celu (no torch converter: its block runs in onnxruntime) → conv2; If(mean(x) > 0): then a
    Conv, else a Conv → conv3."""
    b = graphs._Builder(3)

    def conv(name: str, c_in: int, x: str, y: str) -> None:
        b.node("Conv", [x, b.conv_weight(f"{name}_w", 8, c_in, 3), b.small(f"{name}_b", (8,))], [y], name=name,
               pads=[1, 1, 1, 1])

    conv("conv1", 3, "x", "c1")
    b.node("Celu", ["c1"], ["a"], name="celu")
    conv("conv2", 8, "a", "c2")
    b.node("ReduceMean", ["x"], ["m"], name="mean", keepdims=0)
    b.node("Greater", ["m", b.const("zero", np.array(0.0, np.float32))], ["positive"], name="positive")
    branches = {}
    for side in ("then", "else"):
        w = b.conv_weight(f"{side}_w", 8, 8, 3)
        inits = [t for t in b.inits if t.name == w]
        b.inits = [t for t in b.inits if t.name != w]  # the weight lives in the branch
        node = helper.make_node("Conv", ["c2", w], [f"{side}_out"], name=f"{side}_conv", pads=[1, 1, 1, 1])
        branches[f"{side}_branch"] = helper.make_graph(
            [node], f"{side}_graph", [], [helper.make_tensor_value_info(f"{side}_out", TensorProto.FLOAT, None)], inits)
    b.node("If", ["positive"], ["g"], name="by_sign", **branches)
    conv("conv3", 8, "g", "y")
    return b.model("branchy", [graphs._image(size=8)], [graphs._out(graphs.N, 8, 8, 8)], opset=13)


def images(seed: int = 0) -> dict[str, np.ndarray]:
    """CALIB images, their means of both signs so that either If branch runs on some batches."""
    x = np.random.default_rng(seed).standard_normal((CALIB, 3, 8, 8)).astype(np.float32)
    return {"x": x + np.linspace(-0.3, 0.3, CALIB, dtype=np.float32)[:, None, None, None]}


def q_rows(monkeypatch, run: Run = Run.Q) -> list[int]:
    """Spies on TensorCache.write and hold: the rows of every entry of ``run`` made from then on."""
    rows: list[int] = []
    write, hold = TensorCache.write, TensorCache.hold

    def spy(self, key, start, values, total=None):
        if key.run is run and start == 0 and not self.layout.shared(key.tensor):
            rows.append(self.num_samples if total is None else total)
        return write(self, key, start, values, total)

    def held(self, key, array):
        kept = hold(self, key, array)
        if kept and key.run is run:
            rows.append(len(array))
        return kept

    monkeypatch.setattr(TensorCache, "write", spy)
    monkeypatch.setattr(TensorCache, "hold", held)
    return rows


def test_an_unlearned_capture_stores_all_rows_only_for_a_block_calibrated_in_torch(monkeypatch):
    """rtn: the FP capture stores 8 rows of every boundary tensor except the inputs of the If block (its
    act ranges come from its torch run over every sample); with the constant above the sample count it
    stores them all, and the emitted bytes are the same."""
    from onnxflex.pipeline import build_plan
    from onnxflex.options import resolve

    rows = q_rows(monkeypatch, Run.FP)
    few = quantized("rtn")
    samples = few.report["calibration"]["reconstruction_samples"]
    plan = build_plan(branchy_model(), resolve(onnxflex.QuantConfig(method="rtn", latency_rules=False)).plan)
    ops = {n.name: n.op_type for n in plan.model.graph.node}
    full = {t for b in plan.blocks if any(ops[n] == "If" for n in b.nodes) for t in b.inputs}
    assert full and sorted(rows) == sorted([samples] * len(full) + [8] * (len(rows) - len(full))), (rows, full)
    rows.clear()
    monkeypatch.setattr(reconstruct, "UNLEARNED_LOSS_SAMPLES", 10 ** 6)
    every = quantized("rtn")
    assert set(rows) == {samples}, rows
    assert few.model.SerializeToString() == every.model.SerializeToString(), "the emitted bytes differ"


def quantized(method: str, **options) -> onnxflex.QuantResult:
    bits = dict(wbits=4, abits=0) if method == "hqq" else dict(wbits=8, abits=8)
    config = onnxflex.QuantConfig(method=method, seed=0, latency_rules=False, **bits, **options)
    return onnxflex.quantize(branchy_model(), images(), config, progress=False)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_an_unlearned_method_emits_the_bytes_of_an_all_sample_run(method, monkeypatch):
    """The q: entries hold UNLEARNED_LOSS_SAMPLES rows and every block's losses are on that many samples,
    through a torch block, an onnxruntime block and an If block; with the constant above the sample count
    every row is run, and the emitted bytes are the same."""
    rows = q_rows(monkeypatch)
    few = quantized(method)
    samples = few.report["calibration"]["reconstruction_samples"]
    assert set(rows) == {reconstruct.UNLEARNED_LOSS_SAMPLES} == {8}, rows
    assert {b["loss_samples"] for b in few.report["blocks"]} == {8}, few.report["blocks"]
    assert {b["runtime"] for b in few.report["blocks"]} == {"torch", "onnxruntime"}, few.report["blocks"]
    assert any(n.op_type == "If" for n in few.model.graph.node)
    rows.clear()
    monkeypatch.setattr(reconstruct, "UNLEARNED_LOSS_SAMPLES", 10 ** 6)
    every = quantized(method)
    assert set(rows) == {samples}, rows
    assert {b["loss_samples"] for b in every.report["blocks"]} == {samples}
    assert few.model.SerializeToString() == every.model.SerializeToString(), f"{method}: the emitted bytes differ"
    assert np.isfinite([b["loss_after"] for b in few.report["blocks"]]).all()


def test_the_report_says_the_losses_are_on_8_samples():
    report = quantized("rtn").report
    samples = report["calibration"]["reconstruction_samples"]
    assert f"block losses on 8 of the {samples} calibration samples" in summary(report), summary(report)


def test_a_learned_method_runs_the_quantized_path_on_every_sample(monkeypatch):
    """Every block's quantized path runs on every sample; the block that runs in onnxruntime (Celu, and
    the If) learns nothing: its loss is on 8 samples, and capture stores 8 FP rows of its output, which
    only that loss reads. The bytes are those of a run that stores and scores every row."""
    rows = q_rows(monkeypatch)
    fp_rows = q_rows(monkeypatch, Run.FP)
    few = quantized("flexround", iters=4, batch_size=8)
    report = few.report
    samples = report["calibration"]["reconstruction_samples"]
    assert set(rows) == {samples}, rows
    assert [b["runtime"] for b in report["blocks"]] == ["onnxruntime", "torch"], report["blocks"]
    assert [b["loss_samples"] for b in report["blocks"]] == [8, samples], report["blocks"]
    assert sorted(fp_rows) == [8, samples, samples], fp_rows  # x, block0's output (8), y
    assert f"block losses on 8 of the {samples} calibration samples" in summary(report), summary(report)
    fp_rows.clear()
    monkeypatch.setattr(reconstruct, "UNLEARNED_LOSS_SAMPLES", 10 ** 6)
    every = quantized("flexround", iters=4, batch_size=8)
    assert set(fp_rows) == {samples}, fp_rows
    assert {b["loss_samples"] for b in every.report["blocks"]} == {samples}
    assert few.model.SerializeToString() == every.model.SerializeToString(), "the emitted bytes differ"


def test_a_resumed_unlearned_run_writes_the_same_bytes(tmp_path, monkeypatch):
    """Every block restored from its checkpoint stores its 8 quantized rows again for the next block."""
    first = quantized("rtn", checkpoint_dir=str(tmp_path))
    rows = q_rows(monkeypatch)
    again = quantized("rtn", checkpoint_dir=str(tmp_path))
    assert rows and set(rows) == {8}, rows
    assert again.model.SerializeToString() == first.model.SerializeToString()
    assert [b["loss_after"] for b in again.report["blocks"]] == [b["loss_after"] for b in first.report["blocks"]]


class _Steps:
    """A step budget's ``iters_of``: the given steps per block."""

    def __init__(self, steps):
        self.steps = steps

    def iters_of(self, index: int) -> int:
        return self.steps[index]


def test_blocks_after_the_last_that_learns_run_the_quantized_path_on_8_samples():
    """Under a step budget, the blocks after the last one given steps only report their losses: 8 samples;
    every block up to it feeds a learner's q: inputs: all of them. A block that does not learn (no steps,
    or no torch converter) reports its loss on 8 samples wherever it is."""
    from types import SimpleNamespace

    from onnxflex.options import resolve

    config = resolve(onnxflex.QuantConfig(method="flexround"))
    blocks = [SimpleNamespace(unsupported=u) for u in ((), ("Celu (celu)",), (), ())]
    plan = SimpleNamespace(model=branchy_model(), blocks=blocks, head_points=())
    cache = TensorCache(1 << 30)
    cache.num_samples = 36
    for steps, path, loss in (([5, 0, 3, 0], [36, 36, 36, 8], [36, 8, 36, 8]),
                              ([5, 9, 0, 0], [36, 8, 8, 8], [36, 8, 8, 8]),
                              ([0, 0, 0, 0], [8, 8, 8, 8], [8, 8, 8, 8]),
                              ([0, 0, 0, 2], [36] * 4, [8, 8, 8, 36])):
        runner = reconstruct.BlockRunner(plan, cache, None, None, config.rounding, None, (), _Steps(steps))
        assert [runner.path_samples(i) for i in range(4)] == path, (steps, path)
        assert [runner.loss_samples(i) for i in range(4)] == loss, (steps, loss)


def _wide_tail_model() -> onnx.ModelProto:
    """conv1 3→8 → Relu → conv2 8→8 → Relu → conv3 8→256: the last block costs far more than a budget of
    20 FP passes pays for its first steps, the first ones far less."""
    b = graphs._Builder(5)
    for name, c_in, c_out, x, y in (("conv1", 3, 8, "x", "c1"), ("conv2", 8, 8, "r1", "c2"), ("conv3", 8, 256, "r2", "y")):
        b.node("Conv", [x, b.conv_weight(f"{name}_w", c_out, c_in, 3), b.small(f"{name}_b", (c_out,))], [y],
               name=name, pads=[1, 1, 1, 1])
        if name != "conv3":
            b.node("Relu", [y], ["r" + y[1:]], name=f"relu_{name}")
    return b.model("wide_tail", [graphs._image(size=8)], [graphs._out(graphs.N, 256, 8, 8)], opset=13)


def test_a_budgeted_run_emits_the_bytes_of_an_all_sample_run(monkeypatch):
    """--preset fast: what the blocks after the last learner store is read by no learning, and the losses
    of the blocks given no steps are only reported, so running them on every sample, and capturing every
    FP row of their outputs, emits the same model. The budget is planned before capture, which stores 8
    FP rows of what only blocks without steps read (block0's output: block1 takes its act ranges from
    the capture run)."""
    rows = q_rows(monkeypatch)
    fp_rows = q_rows(monkeypatch, Run.FP)
    config = onnxflex.QuantConfig(method="flexround", preset="fast", step_budget=20, seed=0, latency_rules=False,
                                  granularity="layer")
    few = onnxflex.quantize(_wide_tail_model(), images(), config, progress=False)
    planned = [b["steps"] for b in few.report["step_budget"]["blocks"]]
    samples = few.report["calibration"]["reconstruction_samples"]
    assert planned[0] == 0 and planned[1] and not planned[2], f"the case needs an unlearned block first: {planned}"
    assert [b["loss_samples"] for b in few.report["blocks"]] == [8, samples, 8], (planned, few.report["blocks"])
    assert sorted(rows) == [8, samples, samples, samples], rows  # q: x, block0 and block1 feed block1 (8: block2)
    assert sorted(fp_rows) == [8, 8, samples, samples], fp_rows  # x, block0's output (8), block1's, y (8)
    fp_rows.clear()
    monkeypatch.setattr(reconstruct, "UNLEARNED_LOSS_SAMPLES", 10 ** 6)
    every = onnxflex.quantize(_wide_tail_model(), images(), config, progress=False)
    assert set(fp_rows) == {samples}, fp_rows
    assert {b["loss_samples"] for b in every.report["blocks"]} == {samples}
    assert few.model.SerializeToString() == every.model.SerializeToString(), "the emitted bytes differ"
