"""The latency ratio of two models with a confidence interval, and the gate on it (``compare``).

A single median per model flaps on a busy machine: load that arrives while one model runs and is gone
for the other moves the ratio by any factor. So the two models are timed in interleaved rounds (each
round runs both, in alternating order), and each round gives one paired log-ratio
``log(candidate) - log(reference)``; load that lasts a round slows both runs alike and cancels. Rounds
continue until the 95 % t-interval of the mean log-ratio is within ``width`` (relative half-width of
the ratio's interval, 5 % by default) or until ``max_seconds`` / ``max_rounds``; the ratio reported
is exp(mean), with the interval exp(mean ± t·se).

The gate (``--max-latency-ratio BAR``) decides on the whole interval: it fails only when the interval
lies entirely above BAR, passes when it lies entirely below, and when it straddles BAR it passes with
a note saying the measurement could not tell (more time, ``--latency-seconds``, or a quieter machine
can).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

WIDTH = 0.05  # stop when the ratio's 95 % interval is within ±5 % of it
MAX_SECONDS = 5.0
MAX_ROUNDS = 10_000
MIN_ROUNDS = 5
Z95 = 1.959964


@dataclass(frozen=True)
class RatioEstimate:
    """Milliseconds per run (geometric means over the rounds) and the candidate / reference ratio with
    its 95 % interval [low, high]; ``converged``: the interval reached ``width`` before the limits."""

    reference_ms: float
    candidate_ms: float
    ratio: float
    low: float
    high: float
    rounds: int
    seconds: float
    width: float
    converged: bool

    def to_dict(self) -> dict:
        return asdict(self)


T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)  # two-sided 95 % quantiles of Student's t, df = 1..30


def t_quantile(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom: the table to 30, beyond it
    the Cornish-Fisher expansion around the normal (error below 1e-4 there)."""
    if df <= len(T95):
        return T95[max(df, 1) - 1]
    z = Z95
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)


def _interval(logs: list[float]) -> tuple[float, float]:
    """(mean, half-width) of the 95 % t-interval of ``logs``."""
    n = len(logs)
    mean = sum(logs) / n
    var = sum((x - mean) ** 2 for x in logs) / max(n - 1, 1)
    return mean, t_quantile(n - 1) * math.sqrt(var / n)


def measure_ratio(run_reference: Callable[[], None], run_candidate: Callable[[], None], *,
                  min_rounds: int = MIN_ROUNDS, width: float = WIDTH, max_seconds: float = MAX_SECONDS,
                  max_rounds: int = MAX_ROUNDS, clock: Callable[[], float] = time.perf_counter) -> RatioEstimate:
    """Times the two callables in interleaved rounds until the interval is narrow enough (module
    docstring). ``clock`` returns seconds; tests pass a fake one."""
    start = clock()
    ref_logs, cand_logs, diffs = [], [], []
    converged = False
    while len(diffs) < max_rounds:
        pair = {}
        order = (("r", run_reference), ("c", run_candidate))
        for key, run in order if len(diffs) % 2 == 0 else order[::-1]:
            t = clock()
            run()
            pair[key] = max(clock() - t, 1e-9)
        ref_logs.append(math.log(pair["r"]))
        cand_logs.append(math.log(pair["c"]))
        diffs.append(cand_logs[-1] - ref_logs[-1])
        if len(diffs) >= max(min_rounds, 2):
            mean, half = _interval(diffs)
            if math.exp(half) - 1 <= width:
                converged = True
                break
            if clock() - start >= max_seconds:
                break
    mean, half = _interval(diffs) if len(diffs) >= 2 else (diffs[0], math.inf)
    return RatioEstimate(reference_ms=1e3 * math.exp(sum(ref_logs) / len(ref_logs)),
                         candidate_ms=1e3 * math.exp(sum(cand_logs) / len(cand_logs)),
                         ratio=math.exp(mean), low=math.exp(mean - half), high=math.exp(mean + half),
                         rounds=len(diffs), seconds=clock() - start, width=width, converged=converged)


def ratio_gate(estimate: RatioEstimate, bar: float) -> tuple[str | None, str | None]:
    """(failure, note) of ``--max-latency-ratio bar``: a failure when the whole interval is above the bar,
    a note when it straddles the bar (the gate then passes), (None, None) when it is below."""
    shown = (f"latency ratio {estimate.ratio:.3f} (95% interval {estimate.low:.3f}-{estimate.high:.3f}, "
             f"{estimate.rounds} rounds)")
    if estimate.low > bar:
        return f"{shown} is above {bar:g} ({estimate.candidate_ms:.3f} ms vs {estimate.reference_ms:.3f} ms)", None
    if estimate.high > bar:
        return None, (f"{shown} straddles --max-latency-ratio {bar:g}: the gate passes, as the measurement "
                      "cannot tell; give it more time (--latency-seconds) or a quieter machine to decide")
    return None, None
