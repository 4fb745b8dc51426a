"""One measured run in a fresh child process, shared by the bench scripts: its JSON figures, its own
peak RSS, and a time limit after which it is killed (the row says so; the benchmark goes on).

The child reports its peak RSS itself (``peak_rss_mib()`` into its JSON line): os.wait4's ru_maxrss
of a child also counts the parent's resident pages at the fork (Linux folds the forked copy's high-water
mark in at exec), so it reads as the benchmark's own size, not the quantization's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time

POLL_SECONDS = 0.2


def peak_rss_mib() -> float:
    """This process's own peak resident set (VmHWM of its address space since exec), in MiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def run_measured(argv: list[str], timeout: float | None = None) -> dict:
    """Runs ``argv`` and returns the JSON object on the last line of its stdout (with the child's own
    ``peak_rss_mib``; ru_maxrss from os.wait4, an over-estimate, where the child gave none), or ``{"error": ...}``: the last line of its stderr,
    or that it ran past ``timeout`` seconds (its whole process group is then killed)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(argv, stdout=out, stderr=errors, text=True, start_new_session=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
        while pid == 0:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                os.wait4(proc.pid, 0)
                return {"error": f"timed out after {timeout:.0f} s"}
            time.sleep(POLL_SECONDS)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), errors.seek(0)
        stdout, stderr = out.read(), errors.read()
    if proc.returncode < 0:  # its stderr's last line is then some earlier warning, not the cause
        name = signal.Signals(-proc.returncode).name
        cause = " (the kernel's out-of-memory killer sends this)" if name == "SIGKILL" else ""
        return {"error": f"killed by {name}{cause}"}
    if proc.returncode:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        return {"error": (lines[-1] if lines else f"exit status {proc.returncode}")[:200]}
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures.setdefault("peak_rss_mib", usage.ru_maxrss / 1024)
    return figures
