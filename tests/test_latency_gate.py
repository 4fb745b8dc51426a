"""compare's latency gate (onnxflex/timing.py) on a fake clock: interleaved rounds, the interval, and a
decision that does not flap when load comes and goes; compare's labelled header and skipped tensors."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from onnxflex.cli import main
from onnxflex.timing import measure_ratio, ratio_gate, t_quantile


class FakeMachine:
    """A clock and two 'models': a run of one advances the clock by its base time, times the load of
    the moment (load comes in bursts of ``burst`` seconds, each burst's factor drawn at random up to
    ``spike``), times a little noise of its own."""

    def __init__(self, reference_s: float, candidate_s: float, *, seed: int, spike: float = 1.0,
                 burst: float = 0.05, noise: float = 0.02) -> None:
        self.now, self.rng, self.calls = 0.0, np.random.default_rng(seed), []
        self.base = {"r": reference_s, "c": candidate_s}
        self.spike, self.burst, self.noise = spike, burst, noise
        self._burst_end, self._load = 0.0, 1.0

    def clock(self) -> float:
        return self.now

    def run(self, key: str):
        def go():
            if self.now >= self._burst_end:  # the load changes between bursts, not within them
                self._burst_end = self.now + self.burst
                self._load = 1.0 if self.rng.random() < 0.5 else float(self.rng.uniform(1.0, self.spike))
            self.calls.append(key)
            self.now += self.base[key] * self._load * float(np.exp(self.rng.normal(0.0, self.noise)))
        return go

    def measure(self, **kwargs):
        return measure_ratio(self.run("r"), self.run("c"), clock=self.clock, **kwargs)


def test_rounds_interleave_and_alternate_their_order():
    machine = FakeMachine(1e-3, 2e-3, seed=0)
    estimate = machine.measure(min_rounds=6, width=1.0)  # wide: stops at the least number of rounds
    assert estimate.rounds == 6 and machine.calls == ["r", "c", "c", "r"] * 3, machine.calls


def test_interval_narrows_until_the_width_and_holds_the_true_ratio():
    machine = FakeMachine(1e-3, 0.5e-3, seed=1, noise=0.05)
    estimate = machine.measure(width=0.02)
    assert estimate.converged and estimate.high / estimate.ratio - 1 <= 0.021, estimate
    assert estimate.low < 0.5 < estimate.high, estimate
    assert estimate.reference_ms == pytest.approx(1.0, rel=0.05)
    assert estimate.candidate_ms == pytest.approx(0.5, rel=0.05)


def test_bursts_of_load_do_not_flap_the_decision():
    """Load bursts up to 8x (a busy CI machine) move single timings by far more than the true 0.5 ratio;
    paired rounds cancel them, so the decision and the ratio hold across runs."""
    decisions, ratios, sequential = set(), [], []
    for seed in range(6):
        sequential.append(_sequential_ratio(FakeMachine(1e-3, 0.5e-3, seed=seed, spike=8.0)))
        estimate = FakeMachine(1e-3, 0.5e-3, seed=seed, spike=8.0).measure()
        failure, note = ratio_gate(estimate, 0.8)
        decisions.add((failure is None, note is None))
        ratios.append(estimate.ratio)
        assert ratio_gate(estimate, 0.3)[0] is not None, estimate  # wholly above 0.3: fails
    assert decisions == {(True, True)}, decisions
    assert max(ratios) / min(ratios) < 1.15, ratios
    assert max(sequential) / min(sequential) > 1.5, f"the fake machine must flap a plain median: {sequential}"


def _sequential_ratio(machine: FakeMachine) -> float:
    """What compare did before: the median of 20 runs of one model, then of the other."""
    times = {}
    for key in ("r", "c"):
        run, times[key] = machine.run(key), []
        for _ in range(20):
            start = machine.now
            run()
            times[key].append(machine.now - start)
    return float(np.median(times["c"]) / np.median(times["r"]))


def test_the_gate_fails_only_when_the_whole_interval_is_above_the_bar():
    estimate = FakeMachine(1e-3, 1.3e-3, seed=3, noise=0.05).measure(width=0.02)
    assert estimate.low > 1.2 and estimate.high < 1.4, estimate
    failure, note = ratio_gate(estimate, 1.2)
    assert failure and "is above 1.2" in failure and "95% interval" in failure and note is None
    assert ratio_gate(estimate, 1.4) == (None, None)
    failure, note = ratio_gate(estimate, 1.3)
    assert failure is None and "straddles --max-latency-ratio 1.3" in note and "the gate passes" in note


def test_noisy_timing_stops_at_the_time_limit_and_says_so():
    estimate = FakeMachine(1e-3, 1e-3, seed=4, noise=1.0).measure(width=0.001, max_seconds=0.5)
    assert not estimate.converged and 0.5 <= estimate.seconds < 0.52, estimate
    assert estimate.low < 1.0 < estimate.high


def test_t_quantiles():
    assert t_quantile(1) == 12.706 and t_quantile(30) == 2.042
    assert t_quantile(31) == pytest.approx(2.0395, abs=2e-3) and t_quantile(10_000) == pytest.approx(1.96, abs=1e-3)


def empty_output_model(tmp_path):
    """x[N, 4] → Relu → y, and Slice(x, 0:0 on axis 1) → e[N, 0] (an empty output)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    consts = [numpy_helper.from_array(np.array([0], np.int64), n) for n in ("s", "a")]
    consts[1] = numpy_helper.from_array(np.array([1], np.int64), "a")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Slice", ["x", "s", "s", "a"], ["e"])], "empty",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 0])], consts)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    return path, tmp_path / "d.npz"


def test_compare_header_is_in_argument_order_and_notes_skipped_tensors(tmp_path):
    model, data = empty_output_model(tmp_path)
    result = CliRunner().invoke(main, ["compare", str(model), str(model), "--data", str(data), "--min-sqnr", "30",
                                       "--repeats", "2", "--latency-seconds", "0.2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:3] == [f"reference: {model}", f"candidate: {model}", "samples: 8"], lines
    assert "output e: skipped (empty)" in lines and "output y: SQNR inf dB" in result.stdout, result.stdout
    assert "note: output 'e' is empty: no gate applies to it" in lines, lines
    latency = next(line for line in lines if line.startswith("latency:"))
    assert "reference " in latency and "candidate " in latency and "95% interval" in latency, latency
