"""A fixed seed gives byte-identical output on one machine, across processes.

tests/test_passes_and_emit.py checks two runs in one process; here each run is its own
``python -m onnxflex.cli`` process with a different PYTHONHASHSEED, so set and dict orders that depend
on string hashing, per-process caches and import order cannot leak into the output.
"""
from __future__ import annotations

import json
import os

from helpers import CNN, run_cli
from onnxflex.report import timeless

SEED = 3


def quantize_in_subprocess(out, hash_seed: int) -> None:
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    done = run_cli("quantize", str(CNN), "-o", str(out), "--method", "flexround", "--iters", "20", "--calib-samples",
                   "64", "--batch-size", "16", "--seed", str(SEED), "--device", "cpu", "--quiet", env=env)
    assert done.returncode == 0, f"quantize failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def test_same_seed_gives_identical_files_across_processes(tmp_path):
    first, second = tmp_path / "first.onnx", tmp_path / "second.onnx"
    quantize_in_subprocess(first, hash_seed=1)
    quantize_in_subprocess(second, hash_seed=2)
    a, b = first.read_bytes(), second.read_bytes()
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise AssertionError(f"outputs differ: {len(a)} vs {len(b)} bytes, first difference at byte {at}")

    reports = [json.loads((tmp_path / f"{p.name}.report.json").read_text()) for p in (first, second)]
    for report in reports:
        assert report["seed"] == SEED and report["config"]["seed"] == SEED
        assert set(report["versions"]) >= {"onnxflex", "onnx", "onnxruntime", "torch", "numpy", "python"}
        assert all(isinstance(v, str) and v for v in report["versions"].values()), report["versions"]
    same = [timeless(r) for r in reports]  # timings, block seconds and the measured latency left out
    assert same[0] == same[1], "reports differ beyond timings"
    losses = [[(blk["loss_before"], blk["loss_after"]) for blk in r["blocks"]] for r in reports]
    assert losses[0] == losses[1], f"block losses differ: {losses}"
