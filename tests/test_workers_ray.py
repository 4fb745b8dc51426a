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


def test_a_ray_client_address_without_grpcio_is_refused_naming_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"Ray Client address, which needs grpcio .*onnxflex\[ray\]"):
        QuantConfig(workers=2, ray_address="ray://127.0.0.1:10001")
    QuantConfig(workers=2, ray_address="127.0.0.1:6379")  # a head node's address needs no grpcio


def test_an_unreachable_ray_client_address_is_told_about_the_client_server_port():
    from onnxflex.workers import _unreachable

    told = _unreachable("ray://10.0.0.1:10001", ConnectionError("ray client connection timeout"))
    assert "ray client connection timeout" in told and "--ray-client-server-port" in told
    assert "--ray-client-server-port" not in _unreachable("10.0.0.1:6379", ConnectionError("refused"))
