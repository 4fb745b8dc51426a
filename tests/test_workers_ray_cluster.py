"""--ray-address host:port and ray://host:port (Ray Client): a Ray cluster started apart from onnxflex
(``ray start --head``, its own processes, token authentication on as Ray's ``ray start`` now asks, a
Ray Client server on a port of its own) takes the block jobs of a ``quantize`` run in another process,
which writes the bytes one process writes; a cluster that refuses the connection ends the run with exit
2 and says what to set. Skipped only where Ray is not installed (CI installs it, with Ray Client's
grpcio: the ray extra)."""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from helpers import CNN, run_cli  # noqa: E402

TOKEN = secrets.token_hex(16)
FLAGS = ["--method", "flexround", "--block-input", "quantized", "--wbits", "4", "--weight-scale", "mse",
         "--iters", "20", "--calib-samples", "64", "--batch-size", "16", "--seed", "5", "--device", "cpu",
         "--no-latency-rules", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """{"gcs": the head node's host:port, "client": its Ray Client address}, a 2-CPU cluster run by
    ``ray start --head --block`` in its own session."""
    port, client, log = _free_port(), _free_port(), tmp_path_factory.mktemp("ray") / "head.log"
    ray_cli = Path(sys.executable).with_name("ray")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    with open(log, "w") as out:
        head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
                                 "--ray-client-server-port", str(client), "--include-dashboard", "false",
                                 "--disable-usage-stats"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not start a cluster:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"gcs": f"127.0.0.1:{port}", "client": f"ray://127.0.0.1:{client}"}
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block stops the cluster's processes on SIGTERM
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its graceful stop can take half a minute
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # ray start's default address
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def _quantize(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli("quantize", str(CNN), "-o", str(out), *FLAGS, *extra, env=env)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("one") / "one.onnx"
    done = _quantize(out)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


@pytest.mark.parametrize("kind", ["gcs", "client"])
def test_a_cluster_started_apart_writes_the_bytes_of_one_process(cluster, one_process, kind, tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    done = _quantize(tmp_path / "ray.onnx", "--workers", "2", "--ray-address", cluster[kind], env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ray.onnx").read_bytes() == one_process


def test_a_cluster_that_refuses_the_connection_is_bad_input(cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # no token sent
    env["RAY_gcs_server_port_wait_time_s"] = "2"  # Ray's connection tries: 2 s, not 20
    done = _quantize(tmp_path / "refused.onnx", "--workers", "2", "--ray-address", cluster["gcs"], env=env)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert f"--ray-address {cluster['gcs']}" in done.stderr, done.stderr[-2000:]
    assert "RAY_AUTH_MODE=token" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "refused.onnx").exists()
