"""The wiring (onnxflex/pipeline.py): stages hand frozen records on, refiners return new plans, the
report is built from the records and records the config as it ran."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

import onnxflex
from graphs import matmul_bias_mlp
from helpers import CNN
from onnxflex.calib import load_npz
from onnxflex.config import QuantConfig
from onnxflex.options import resolve
from onnxflex.pipeline import plan, run_pipeline
from onnxflex.progress import Progress
from onnxflex.refiners import REFINERS, RefineContext, Refinement, Step, refine
from onnxflex.report import build_report

RTN = QuantConfig(method="rtn")


def test_the_report_records_the_batch_the_model_fixes():
    """matmul_bias_mlp fixes the batch at 1: the run reconstructs in batches of 1, and the report's
    config says so (it said the caller's 32 before)."""
    x = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32)
    result = onnxflex.quantize(matmul_bias_mlp(), {"x": x}, RTN, progress=False)
    assert resolve(RTN).rounding.batch_size != 1
    assert result.report["config"]["batch_size"] == 1, result.report["config"]
    assert result.report["reconstruction"]["batch_size"] == 1, result.report["reconstruction"]


def test_the_plan_stage_fixes_the_batch_and_leaves_the_model_alone():
    model = matmul_bias_mlp()
    before = model.SerializeToString()
    given = resolve(RTN)
    planned = plan(model, given)
    assert model.SerializeToString() == before
    assert planned.fixed_batch == 1 and given.rounding.batch_size != 1
    assert planned.config == given.replace(rounding=given.rounding.replace(batch_size=1, accumulate=8))
    assert plan(onnx.load(str(CNN)), given).config is given  # a dynamic batch keeps the caller's options
    with pytest.raises(dataclasses.FrozenInstanceError):
        planned.config = given


def refiner_that(label: str, calls: list):
    """A refiner recording (label, the plan it was given) that returns a new plan with one block fewer."""

    def refiner(plan, config, data, ctx):
        calls.append((label, plan))
        return Refinement(dataclasses.replace(plan, blocks=plan.blocks[1:]), config, {"by": label})

    return refiner


def test_refiners_run_in_order_each_on_the_plan_the_one_before_returned():
    planned = plan(onnx.load(str(CNN)), resolve(RTN))
    calls: list = []
    steps = (Step("first", refiner_that("first", calls), {}, timed=True),
             Step("off", lambda plan, config, data, ctx: None, [], timed=True),
             Step("second", refiner_that("second", calls), {}, timed=False))
    ctx = RefineContext(planned.plan.model, (), ("CPUExecutionProvider",), Progress(False))
    refined = refine(planned, None, ctx, steps)
    assert [label for label, _ in calls] == ["first", "second"]
    assert calls[0][1] is planned.plan and len(calls[1][1].blocks) == len(planned.plan.blocks) - 1
    assert len(refined.plan.blocks) == len(planned.plan.blocks) - 2
    assert refined.sections == {"first": {"by": "first"}, "off": [], "second": {"by": "second"}}
    assert list(refined.timings) == ["first"], "only timed refiners that ran are timed"
    assert [s.section for s in REFINERS] == ["latency_placement", "layernorm_folds", "mixed_precision"]


def test_the_api_wraps_the_pipeline_result():
    data = load_npz(CNN.with_suffix(".calib.npz"), onnx.load(str(CNN))).take(0, 48)
    run = run_pipeline(CNN, data.arrays, RTN, Progress(False))
    assert run.model is run.emitted.model and run.plan is run.refined.plan and run.config is run.refined.config
    report = build_report(run, ["w", "w"], 1.0)
    assert report["warnings"] == ["w"] and report["timings"]["total"] == 1.0
    assert [b["name"] for b in report["blocks"]] == [b.name for b in run.plan.blocks]
    assert report["calibration"]["verification_samples"] == run.samples.held.num_samples > 0
    api = onnxflex.quantize(CNN, data.arrays, RTN, progress=False)
    assert api.model.SerializeToString() == run.model.SerializeToString()
    assert api.report.keys() == report.keys() and api.report["layers"] == report["layers"]


@pytest.mark.parametrize("given, expected", [
    ({}, "1000 0 None"),  # libgomp spins briefly, Intel's and LLVM's OpenMP sleep at once
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "None None ACTIVE"),
    ({"KMP_BLOCKTIME": "5"}, "None 5 None"),
])
def test_a_quantize_run_bounds_how_torchs_waiting_threads_spin_unless_the_caller_chose(given, expected):
    """In a fresh process, quantize sets how OpenMP's idle threads wait before it imports torch
    (device.sleeping_waits), and leaves alone a caller who set any of it; with torch imported first it
    changes nothing."""
    import os
    import subprocess
    import sys

    from onnxflex.device import WAIT_SETTINGS

    clean = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}
    show = "print(*(os.environ.get(k) for k in ('GOMP_SPINCOUNT', 'KMP_BLOCKTIME', 'OMP_WAIT_POLICY')))\n"
    script = ("import os, sys, onnxflex\n"
              "assert 'torch' not in sys.modules\n"
              f"onnxflex.quantize({str(CNN)!r}, None, onnxflex.QuantConfig(method='rtn', latency_rules=False),"
              " progress=False)\n" + show)
    out = subprocess.run([sys.executable, "-c", script], env={**clean, **given}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == expected, out.stdout
    first = subprocess.run([sys.executable, "-c", "import torch, os\nfrom onnxflex.device import sleeping_waits\n"
                            "sleeping_waits()\n" + show], env=clean, capture_output=True, text=True, timeout=300)
    assert first.stdout.splitlines()[-1] == "None None None", first.stdout + first.stderr[-2000:]
