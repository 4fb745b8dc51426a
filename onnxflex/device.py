"""Pick the compute device for capture (onnxruntime providers) and reconstruction (torch)."""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from onnxflex.errors import DeviceError

log = logging.getLogger("onnxflex")

# One CPU thread per this many values of a block's largest step tensor: an op on fewer values takes tens
# of microseconds on one thread, and splitting it costs a fork/join, which on a machine whose cores other
# processes hold waits milliseconds for a time slice (BENCHMARKS.md, reconstruction speed).
VALUES_PER_THREAD = 1 << 18


# OpenMP settings that decide how torch's idle threads wait; a caller who set any of them keeps its own
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# libgomp (torch's OpenMP in its Linux wheels) spins this many times, a few microseconds, before a
# waiting thread sleeps: back-to-back ops find it awake, a core another process needs is soon released
SPIN_COUNT = 1000


def sleeping_waits() -> None:
    """Before torch's first import in the process: its OpenMP threads spin briefly while they wait for
    work (GOMP_SPINCOUNT SPIN_COUNT; Intel's and LLVM's OpenMP, which read KMP_BLOCKTIME instead, sleep
    at once), unless the caller set how they wait (WAIT_SETTINGS). libgomp's default spins 300,000
    times, and on a machine whose cores other processes hold a spinning thread burns the time slice its
    partner needs: ddddocr_det --preset fast at load 4 on 2 cores took 27 s in the block loop (its
    8-sample head block 8.9 s), 8.6 s (1.35 s) sleeping at once (OMP_WAIT_POLICY PASSIVE). Sleeping at
    once costs each op's fork a wake-up instead: a whole fast run of that model (in one process, torch's
    import included) took 8.1-9.9 s on an idle machine, 7.1-8.5 s with 1,000 to 20,000 spins, runs
    interleaved; under two busy processes the two were within their run-to-run spread (17-28 s).
    Results are the same either way. Once torch is imported the settings are fixed
    (OpenMP reads them when it loads), so this then does nothing."""
    import sys

    if "torch" not in sys.modules and not any(name in os.environ for name in WAIT_SETTINGS):
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        os.environ["KMP_BLOCKTIME"] = "0"


@dataclass(frozen=True)
class Device:
    torch_device: str
    providers: tuple[str, ...]


def cuda_available() -> tuple[bool, str]:
    """(usable, reason when not): torch must see a GPU and onnxruntime must offer its CUDA provider."""
    import torch

    from onnxflex import ort

    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if "CUDAExecutionProvider" not in ort.available_providers():
        return False, "the installed onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return True, ""


def resolve_device(name: str) -> Device:
    """'cpu', 'cuda' (error when unavailable) or 'auto' (CUDA when usable, else CPU with one log line)."""
    from onnxflex import ort

    cpu = Device("cpu", ort.CPU)
    if name == "cpu":
        return cpu
    ok, why = cuda_available()
    if ok:
        return Device("cuda", ort.CUDA)
    if name == "cuda":
        raise DeviceError(f"--device cuda was asked for but {why}; use --device cpu or --device auto")
    log.info("no usable CUDA device (%s); running on CPU", why)
    return cpu


def threads_for(values: int, device, threads: int = 0) -> int | None:
    """torch's intra-op threads for work on ``device`` (a torch.device) whose largest tensor holds
    ``values`` values: ``threads`` when given (config.threads), else one per VALUES_PER_THREAD, at
    least 1 and at most both torch.get_num_threads() (which OMP_NUM_THREADS sets) and cpu_budget();
    None (torch's setting unchanged) off the CPU. It depends on the model, batch and machine only, never on the load, so a
    seed keeps giving the same output."""
    import torch

    if device.type != "cpu":
        return None
    return threads or max(1, min(torch.get_num_threads(), cpu_budget(), values // VALUES_PER_THREAD))


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's
    --cpus), which torch's default thread count does not see."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


@contextmanager
def torch_threads(count: int | None):
    """Runs the body with ``count`` intra-op threads (None: unchanged) and restores torch's setting."""
    import torch

    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
