"""Fuzz: random small ONNX graphs (tests/fuzz_graphs.py) through `inspect`, `quantize --method rtn` and
`compare`, called in-process through the CLI with its exit codes.

Each graph either quantizes (exit 0) to a model that passes onnx.checker's full check and whose outputs
`compare` finds within MIN_SQNR_DB of FP32, or is refused with a typed error (exit 1 or 2, one line).
Never exit 3 (an internal error) and never an uncaught exception.

CI runs CI_EXAMPLES derandomized examples. ONNXFLEX_FUZZ_EXAMPLES=N runs N random ones instead and
records every outcome as a JSON line in $ONNXFLEX_FUZZ_LOG (default fuzz-log.jsonl) without stopping at
the first failure, for BENCHMARKS.md's count (read the log: a line with a "failure" is a failing graph).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings

from fuzz_graphs import SAMPLES, describe, graphs
from onnxflex.cli import main

CI_EXAMPLES = 200
MIN_SQNR_DB = 15.0  # 8-bit RTN on these shallow random graphs measures 25-50 dB; far below is a bug
CALIBRATED = SAMPLES - SAMPLES // 4  # quantize's reconstruction samples (verify_samples holds out a quarter)
LONG = int(os.environ.get("ONNXFLEX_FUZZ_EXAMPLES", "0"))
LOG = Path(os.environ.get("ONNXFLEX_FUZZ_LOG", "fuzz-log.jsonl"))


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return 3, f"uncaught {type(result.exception).__name__}: {result.exception}"
    return result.exit_code, result.output


def check_graph(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[str, str | None]:
    """(outcome, failure or None): the outcome is 'quantized', 'refused (exit N)' or the failing step."""
    with tempfile.TemporaryDirectory(prefix="onnxflex-fuzz-") as folder:
        fp, q, data = Path(folder, "m.onnx"), Path(folder, "m.q.onnx"), Path(folder, "m.npz")
        onnx.save(model, fp)
        np.savez(data, **feeds)
        code, out = _invoke("inspect", fp)
        if code not in (0, 2):
            return "inspect", f"inspect exit {code}: {out.strip()[-400:]}"
        code, out = _invoke("quantize", fp, "-o", q, "--calib", data, "--method", "rtn", "--quiet",
                            "--device", "cpu", "--threads", "1")
        if code in (1, 2):
            lines = [line for line in out.splitlines() if line.startswith("error:")]
            if len(lines) != 1:
                return "quantize", f"quantize exit {code} without a one-line error: {out.strip()[-400:]}"
            return f"refused (exit {code}): {lines[0][7:][:160]}", None
        if code != 0:
            return "quantize", f"quantize exit {code}: {out.strip()[-400:]}"
        try:
            onnx.checker.check_model(onnx.load(str(q)), full_check=True)
        except Exception as exc:  # the emitted model must be valid
            return "checker", f"onnx.checker: {str(exc).splitlines()[0][:300]}"
        # on the samples it was calibrated on (quantize holds out the last quarter): with 24 samples the
        # held-out ones often reach beyond the calibrated ranges, which is clipping, not a bug
        code, out = _invoke("compare", fp, q, "--data", data, "--samples", CALIBRATED, "--repeats", "1",
                            "--worst", "2", "--latency-seconds", "0", "--json")
        if code != 0:
            return "compare", f"compare exit {code}: {out.strip()[-400:]}"
        sqnrs = [float(o["sqnr_db"]) for o in json.loads(out)["outputs"]]
        if min(sqnrs) < MIN_SQNR_DB:
            return "accuracy", f"SQNR {min(sqnrs):.1f} dB < {MIN_SQNR_DB} dB vs FP32"
        return "quantized", None


SETTINGS = (settings(max_examples=LONG, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))
            if LONG else
            settings(max_examples=CI_EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck)))


@SETTINGS
@given(graphs())
def test_random_graphs_quantize_or_are_refused(case):
    model, feeds = case
    onnx.checker.check_model(model, full_check=True)  # the generator's own contract
    outcome, failure = check_graph(model, feeds)
    if not LONG:
        assert failure is None, f"{describe(model)}: {failure}"
        return
    with LOG.open("a") as f:
        f.write(json.dumps({"graph": describe(model), "outcome": outcome, "failure": failure}) + "\n")

