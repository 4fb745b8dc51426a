"""ray_address: the block jobs as Ray tasks on one local Ray instance with 2 CPUs (shared by these
tests): the bytes of one worker (fp block input, and quantized with the rounders built in tasks), a
killed worker's task run again by Ray, a task's exception raised as itself. Skipped only where Ray is not installed (pip install onnxflex[ray]; CI installs it)."""
from __future__ import annotations

import logging

import pytest

ray = pytest.importorskip("ray")

from onnxflex.config import ConfigError, QuantConfig  # noqa: E402
from onnxflex.workers import KILL_HOOK, ParallelRunner, RayPool  # noqa: E402
from test_workers import QUANTIZED, quantize  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_worker():
    return quantize(workers=1)[0]


def test_ray_tasks_write_the_bytes_of_one_worker(local_ray, one_worker):
    assert quantize(workers=2, ray_address="local")[0] == one_worker
    assert ray.is_initialized()  # a running instance is used, not shut down


def test_ray_tasks_build_the_rounders_ahead_with_quantized_input(local_ray):
    assert quantize(**QUANTIZED, workers=2, ray_address="local")[0] == quantize(**QUANTIZED, workers=1)[0]


def test_ray_runs_a_killed_workers_task_again(local_ray, one_worker, monkeypatch):
    killed = []  # the hook's marker files, made by a task just before its worker exits
    close = ParallelRunner.close
    monkeypatch.setattr(ParallelRunner, "close", lambda self: (killed.extend(p for p in self.markers if p.exists()),
                                                              close(self)))
    monkeypatch.setenv(KILL_HOOK, "1")
    assert quantize(workers=2, ray_address="local")[0] == one_worker
    assert len(killed) == 1, killed


def test_a_task_exception_is_raised_as_itself(local_ray):
    pool = RayPool("local", 1, 1, {"wbits": 99})
    try:
        pool.submit(0, QuantConfig.from_dict, "job")  # QuantConfig.from_dict({"wbits": 99}, "job") in a task
        with pytest.raises(ConfigError, match="wbits=99"):
            pool.result(0)
    finally:
        pool.close()
