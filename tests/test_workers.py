"""workers: with block_input fp every block is an independent job; N local worker processes write the
bytes one process writes, a worker that dies has its block run again, and a job's exception reaches
the caller as itself. With the quantized block input the blocks learn in order here while workers
build the next blocks' rounders (PipelinedRunner): the same bytes as one process, a killed worker's
job run again."""
from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import onnxflex
from helpers import CNN
from onnxflex.cli import main
from onnxflex.config import ConfigError, QuantConfig
from onnxflex.workers import KILL_HOOK, LocalPool, ParallelRunner, PipelinedRunner

# five blocks that each keep what they learn (40 steps), so that the bytes show the learned rounding
FP = dict(method="flexround", block_input="fp", iters=40, calib_samples=64, batch_size=16, seed=5, device="cpu",
          latency_rules=False)


def quantize(**options):
    result = onnxflex.quantize(CNN, None, QuantConfig(**{**FP, **options}), progress=False)
    return hashlib.sha256(result.model.SerializeToString()).hexdigest(), result.report["blocks"]


@pytest.fixture(scope="module")
def one_worker():
    return quantize(workers=1)


def test_one_worker_learns_every_block(one_worker):
    digest, blocks = one_worker
    assert digest != quantize(method="rtn")[0]
    learned = [b for b in blocks if b["iters"] == 40 and b["loss_after"] < b["loss_before"]]
    assert len(learned) >= 3, blocks


def test_two_workers_write_the_bytes_of_one(one_worker, caplog):
    with caplog.at_level(logging.INFO, logger="onnxflex"):
        result = onnxflex.quantize(CNN, None, QuantConfig(**FP, workers=2), progress=True)
    digest, blocks = hashlib.sha256(result.model.SerializeToString()).hexdigest(), result.report["blocks"]
    assert digest == one_worker[0]
    lines = [r.getMessage() for r in caplog.records if " -> " in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == [b["name"] for b in blocks], lines  # one per block, in order
    assert [(b["loss_before"], b["loss_after"]) for b in blocks] == \
        [(b["loss_before"], b["loss_after"]) for b in one_worker[1]]


def test_a_killed_worker_has_its_block_run_again(one_worker, monkeypatch, caplog):
    monkeypatch.setenv(KILL_HOOK, "2")
    with caplog.at_level(logging.WARNING, logger="onnxflex"):
        digest, _ = quantize(workers=2)
    assert "a worker process died" in caplog.text
    assert digest == one_worker[0]


def test_checkpointed_workers_write_the_same_bytes(one_worker, tmp_path):
    assert quantize(workers=2, checkpoint_dir=str(tmp_path))[0] == one_worker[0]
    assert len(list(tmp_path.glob("block*.pt"))) == 5
    assert quantize(workers=2, checkpoint_dir=str(tmp_path))[0] == one_worker[0]  # every block restored


def test_an_exception_in_a_worker_is_raised_as_itself():
    pool = LocalPool(1, 1, {"wbits": 99})
    try:
        pool.submit(0, QuantConfig.from_dict, "job")  # runs QuantConfig.from_dict({"wbits": 99}, "job") there
        with pytest.raises(ConfigError, match="wbits=99"):
            pool.result(0)
    finally:
        pool.close()


# the quantized block input: each block learns on the quantized outputs of the blocks before it; the
# 4-bit MSE step searches are what the workers build ahead
QUANTIZED = dict(FP, block_input="quantized", wbits=4, weight_scale="mse", iters=20)


@pytest.fixture(scope="module")
def one_quantized():
    return quantize(**QUANTIZED, workers=1)


def test_with_quantized_input_two_workers_write_the_bytes_of_one(one_quantized, monkeypatch):
    built = []  # the blocks whose rounders a worker built, as the parent takes them
    run = PipelinedRunner.run

    def recording(self, index, block, progress):
        built.extend(i for i in self.submitted if i == index)
        return run(self, index, block, progress)

    monkeypatch.setattr(PipelinedRunner, "run", recording)
    digest, blocks = quantize(**QUANTIZED, workers=2)
    assert digest == one_quantized[0]
    assert built == [1, 2, 3, 4], built  # every block but the first, which builds its own
    assert [(b["loss_before"], b["loss_after"]) for b in blocks] == \
        [(b["loss_before"], b["loss_after"]) for b in one_quantized[1]]
    assert digest != quantize(**{**QUANTIZED, "block_input": "fp"})[0]  # the quantized input made a difference


def test_with_quantized_input_a_killed_worker_has_its_rounders_built_again(one_quantized, monkeypatch, caplog):
    monkeypatch.setenv(KILL_HOOK, "2")
    with caplog.at_level(logging.WARNING, logger="onnxflex"):
        digest, _ = quantize(**QUANTIZED, workers=2)
    # the dead worker breaks the pool: the job it ran (2) and any other still running (the next
    # block's, 1 or 3, when it had not finished) run again
    rerun = re.search(r"a worker process died; job\(s\) ([\d, ]+) run again", caplog.text)
    assert rerun, caplog.text
    jobs = [int(j) for j in rerun.group(1).split(", ")]
    assert 2 in jobs and set(jobs) <= {1, 2, 3, 4}, caplog.text
    assert digest == one_quantized[0]


def test_workers_take_either_block_input_and_ray_needs_ray(tmp_path, monkeypatch):
    out = str(tmp_path / "m.onnx")
    for block_input in ("fp", "quantized"):
        done = CliRunner().invoke(main, ["quantize", str(CNN), "-o", out, "--block-input", block_input,
                                         "--workers", "2", "--dump-config"])
        assert done.exit_code == 0 and "workers = 2" in done.output, done.output
    assert QuantConfig().workers == 1 and QuantConfig().ray_address == ""
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    done = CliRunner().invoke(main, ["quantize", str(CNN), "-o", out, "--block-input", "fp", "--ray-address", "local"])
    assert done.exit_code == 2 and "pip install onnxflex[ray]" in done.output, done.output


def test_spilled_entries_reach_the_workers(monkeypatch):
    carried = []  # the kinds of array the jobs carry
    job = ParallelRunner._job

    def recording(self, index):
        made = job(self, index)
        carried.extend(type(a).__name__ for a in made.arrays.values())
        return made

    monkeypatch.setattr(ParallelRunner, "_job", recording)
    one = quantize(workers=1, max_cache_mb=1)[0]  # 1 MiB: the larger conv activations spill to files
    assert "Spilled" in carried and "ndarray" in carried, carried
    assert quantize(workers=2, max_cache_mb=1)[0] == one


def test_an_aborted_pool_stops_its_running_workers_at_once():
    pool = LocalPool(1, 1, ["sleep", "60"])
    pool.submit(0, subprocess.call, -1)  # subprocess.call(["sleep", "60"], -1) in the worker
    deadline = time.monotonic() + 60
    while not pool.executor._processes and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = list(pool.executor._processes.values())
    time.sleep(2)  # the job is running
    started = time.monotonic()
    pool.close(abort=True)
    assert time.monotonic() - started < 20, "close waited for the running job"
    assert workers and not any(p.is_alive() for p in workers)


def test_a_workers_warnings_reach_the_parent_as_one_process_logs_them(caplog):
    def warnings(workers):  # 12 steps: learning is undone in later blocks, each with a warning
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="onnxflex"):
            quantize(workers=workers, iters=12)
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    one = warnings(1)
    assert any("learning ended at loss" in w for w in one), one
    assert warnings(2) == one
