"""Presets (fast, default, best), early stop, and the faster reconstruction loop computing what it did.

The speed itself is measured by bench/bench_reconstruct.py (BENCHMARKS.md); these tests check that the
presets resolve as documented, that early stop stops on a plateau and says so in the report, and that
the fused fake quantizer, the written-out Adam and the chunked minibatch indices compute the same
values as the code they replace.
"""
from __future__ import annotations

import json
import math
import tomllib

import pytest
import torch
from click.testing import CliRunner

import onnxflex
from helpers import CNN, run_model, top1
from onnxflex.cli import main
from onnxflex.config import QuantConfig
from onnxflex.errors import ConfigError
from onnxflex.options import DEFAULT_STEP_CAP, resolve
from onnxflex.rounding.quant import fake_quant, round_ste
from onnxflex.device import VALUES_PER_THREAD, threads_for, torch_threads
from onnxflex.rounding.reconstruct import step_indices
from onnxflex.rounding.policies import AdamCosine, EarlyStop, StepPolicy


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("method, preset, iters, batch, early_stop", [
    ("flexround", "default", 400, 32, 0),
    ("flexround", "fast", 100, 32, 20),
    ("flexround", "best", 1000, 64, 0),
    ("signround", "fast", 50, 32, 10),
    ("signround", "best", 500, 64, 0),
    ("adaround", "fast", 100, 32, 0),  # early stop would cut AdaRound's annealing short
])
def test_presets_resolve_iterations_batch_and_early_stop(method, preset, iters, batch, early_stop):
    config = resolve(QuantConfig(method=method, preset=preset)).rounding
    got = (config.iters, config.batch_size, config.early_stop)
    assert got == (iters, batch, early_stop), f"{method} --preset {preset}: (iters, batch, early stop) {got}"
    if method == "signround":
        assert config.lr == pytest.approx(1.0 / iters), "SignRound's default rate follows the resolved iterations"


def test_explicit_values_win_over_the_preset():
    config = resolve(QuantConfig(preset="fast", iters=300, batch_size=8, early_stop=0)).rounding
    assert (config.iters, config.batch_size, config.early_stop) == (300, 8, 0)
    partly = resolve(QuantConfig(preset="best", iters=7)).rounding
    assert (partly.iters, partly.batch_size, partly.early_stop) == (7, 64, 0)
    assert resolve(QuantConfig(preset="fast", iters=500)).rounding.early_stop == 100, \
        "the fast patience is a fifth of the iterations"


def test_bad_preset_and_early_stop_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"preset='turbo' is not one of fast, default, best"):
        QuantConfig(preset="turbo")
    with pytest.raises(ConfigError, match=r"early_stop=-2 is out of range"):
        QuantConfig(early_stop=-2)
    with pytest.raises(ConfigError, match=r"early_stop=5 does not work with method adaround.*early_stop=0"):
        QuantConfig(method="adaround", early_stop=5)
    with pytest.raises(ConfigError, match=r"batch_size=0 is out of range"):
        QuantConfig(batch_size=0)
    assert invoke("quantize", "--dump-config", "--preset", "turbo").exit_code == 2  # click's choice check


def test_dump_config_keeps_the_preset_defaults_and_comments_what_they_resolve_to(tmp_path):
    result = invoke("quantize", "--dump-config", "--preset", "fast", "--batch-size", "16")
    assert result.exit_code == 0, result.stderr
    values = tomllib.loads(result.stdout)
    assert {k: values[k] for k in ("preset", "iters", "batch_size", "early_stop")} == \
        {"preset": "fast", "iters": -1, "batch_size": 16, "early_stop": -1}, values
    assert "iters = -1  # resolved: 100" in result.stdout and "early_stop = -1  # resolved: 20" in result.stdout
    assert QuantConfig.from_dict(values) == QuantConfig(preset="fast", batch_size=16)
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(result.stdout)
    assert invoke("quantize", "--dump-config", "--config", pinned).stdout == result.stdout
    path = tmp_path / "q.toml"
    path.write_text('preset = "best"\nearly_stop = 30\n')
    config = resolve(QuantConfig.from_toml(path, iters=200)).rounding
    assert (config.preset, config.iters, config.batch_size, config.early_stop) == ("best", 200, 64, 30)


def _run(policy: StepPolicy, patience: int, loss) -> int:
    stop = EarlyStop(policy, patience)
    for it in range(policy.iters):
        if stop.update(it, loss(it)):
            return it + 1
    return policy.iters


def test_early_stop_cuts_a_plateau_and_anneals_over_the_tail():
    config = resolve(QuantConfig(iters=400, early_stop=40)).rounding
    flat = AdamCosine([], [], config)
    steps = _run(flat, 40, lambda it: 1.0 + 0.2 * math.sin(it))  # noisy, but no trend
    assert steps < 150, f"a flat loss ran {steps} of 400 steps"
    last = flat.schedule_step(steps - 1)
    assert last >= 0.95 * config.iters, f"the schedule stood at {last:.0f} of 400 at the last step"
    assert flat.rate(1.0, False, last) < 0.01, "the cosine rate did not anneal by the early end"
    falling = AdamCosine([], [], config)
    assert _run(falling, 40, lambda it: 0.98 ** it) == 400, "a steadily falling loss was stopped"
    assert falling.schedule_step(399) == 399 and falling.cut_at is None
    assert _run(AdamCosine([], [], config), 0, lambda it: 1.0) == 400, "patience 0 must never stop"


def test_early_stop_in_a_run_records_the_steps_each_block_ran():
    # nothing learns at rate 0, so every block's loss is flat and each one stops early
    frozen = dict(iters=200, batch_size=16, calib_samples=64, verify_samples=16, lr=0.0, scale_lr=0.0, act_lr=0.0)
    report = onnxflex.quantize(CNN, config=QuantConfig(early_stop=10, **frozen), progress=False).report
    steps = [b["iters"] for b in report["blocks"]]
    assert steps and all(0 < s < 60 for s in steps), f"steps run per block with early stop 10 of 200: {steps}"
    rec = report["reconstruction"]
    assert rec == {"preset": "default", "iters": 200, "batch_size": 16, "accumulate": 1, "early_stop": 10,
                   "step_cap": DEFAULT_STEP_CAP, "steps_run": sum(steps), "steps_planned": 200 * len(steps), "blocks_stopped_early": len(steps)}, rec
    full = onnxflex.quantize(CNN, config=QuantConfig(early_stop=0, **{**frozen, "iters": 30}), progress=False)
    assert [b["iters"] for b in full.report["blocks"]] == [30] * len(steps)


def test_preset_fast_quantizes_the_cnn_end_to_end(tmp_path, cnn_eval, cnn_fp32_logits):
    out = tmp_path / "fast.onnx"
    result = invoke("quantize", CNN, "--preset", "fast", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "preset fast: up to 100 steps per block of 32 samples, early stop after 20 flat steps" in result.stdout
    report = json.loads((tmp_path / "fast.onnx.report.json").read_text())
    assert report["config"]["preset"] == "fast" and report["reconstruction"]["iters"] == 100
    steps = [b["iters"] for b in report["blocks"]]
    planned = [b["steps"] for b in report["step_budget"]["blocks"]]  # the fast budget's share per block
    assert any(steps) and all(s <= p <= 100 for s, p in zip(steps, planned)), f"steps run {steps}, planned {planned}"
    assert all(b["loss_after"] <= b["loss_before"] for b in report["blocks"]), report["blocks"]
    fp32 = top1(cnn_fp32_logits, cnn_eval["labels"])
    q = top1(run_model(out, {"input": cnn_eval["input"]})[0], cnn_eval["labels"])
    print(f"--preset fast: top-1 {q:.2f}% (FP32 {fp32:.2f}%), steps per block {steps}")
    assert q >= fp32 - 1.0, f"--preset fast top-1 {q:.2f}% vs FP32 {fp32:.2f}%"


@pytest.mark.parametrize("signed", [False, True])
def test_fused_fake_quant_matches_the_unfused_straight_through_form(signed):
    gen = torch.Generator().manual_seed(0)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    zero_point = torch.tensor(0.0 if signed else 40.0)
    x = (torch.randn(8, 16, 12, 12, generator=gen) * 3).requires_grad_()
    log_scale = torch.tensor(-3.0, requires_grad=True)
    upstream = torch.randn(8, 16, 12, 12, generator=gen)

    def reference(v, s):
        return (torch.clamp(round_ste(v / s) + zero_point, qmin, qmax) - zero_point) * s

    results = []
    for f in (reference, lambda v, s: fake_quant(v, s, zero_point, qmin, qmax)):
        x.grad = log_scale.grad = None
        out = f(x, torch.exp(log_scale))
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad.clone(), log_scale.grad.clone()))
    (ref, ref_dx, ref_ds), (got, dx, ds) = results
    levels = torch.round(x.detach() / torch.exp(log_scale.detach())) + zero_point
    clamped = float(((levels < qmin) | (levels > qmax)).float().mean())
    print(f"signed={signed}: clamped share {clamped:.3f}, d/dlog_scale {float(ds):.6g} vs {float(ref_ds):.6g}")
    assert torch.equal(got, ref), "the fused forward must give the unfused values exactly"
    assert torch.allclose(dx, ref_dx, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ds, ref_ds, rtol=1e-5), f"d/dlog_scale {float(ds)} vs {float(ref_ds)}"
    with torch.no_grad():
        assert torch.equal(fake_quant(x, torch.exp(log_scale), zero_point, qmin, qmax), ref)


def test_written_out_adam_matches_torch_adam_with_lambdalr():
    config = resolve(QuantConfig(iters=60)).rounding
    gen = torch.Generator().manual_seed(0)
    shapes = [(10, 3), (16, 4, 3, 3), (4,), ()]
    mine = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    policy = AdamCosine([], [(mine[:2], "lr"), (mine[2:3], "scale_lr"), (mine[3:], "act_lr")], config)
    opt = torch.optim.Adam([{"params": theirs[:2], "lr": config.lr}, {"params": theirs[2:3], "lr": config.scale_lr},
                            {"params": theirs[3:], "lr": config.act_lr}], foreach=False)
    cosine = lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, 60) / 60))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    for it in range(60):
        for a, b in zip(mine, theirs):
            a.grad = torch.randn(a.shape, generator=gen) * 1e-3
            b.grad = a.grad.clone()
        if it in (4, 5):  # a parameter without a gradient keeps its state, as in torch.optim
            mine[2].grad = theirs[2].grad = None
        policy.step(it, 1.0)
        opt.step()
        sched.step()
    worst = max(float((a - b).detach().abs().max()) for a, b in zip(mine, theirs))
    assert worst == 0.0, f"AdamCosine differs from torch.optim.Adam + LambdaLR by up to {worst:.3g}"


def test_minibatch_indices_are_the_per_step_draws_and_threads_follow_the_size():
    gen = torch.Generator().manual_seed(7)
    expected = [torch.randint(0, 200, (16,), generator=gen) for _ in range(150)]
    got = list(step_indices(7, 200, 16, 150, torch.device("cpu")))
    assert len(got) == 150 and all(torch.equal(a, b) for a, b in zip(got, expected))
    cpu = torch.device("cpu")
    assert threads_for(VALUES_PER_THREAD - 1, cpu) == 1
    assert threads_for(1 << 40, cpu) == torch.get_num_threads()
    assert threads_for(1 << 40, torch.device("cuda")) is None
    assert threads_for(VALUES_PER_THREAD - 1, cpu, threads=3) == 3, "an explicit --threads wins"
    with pytest.raises(ConfigError, match=r"threads=-1 is out of range"):
        QuantConfig(threads=-1)
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
