"""Exit codes every command keeps (onnxflex.exits): 0 ok, 1 a gate/check failed, 2 bad input or usage,
3 internal error with a traceback log, 130/143 on SIGINT/SIGTERM with temporary files removed.

Run as subprocesses, as CI runs the tool."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import CNN, MODELS

EVAL = MODELS / "digits_cnn.eval.npz"


def run_cli(tmp_path: Path, *args, inject: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """``onnxflex ARGS`` in a fresh interpreter whose temporary folder is ``tmp_path/tmp``, through the
    console script's entry point (cli.run: its exit skips the interpreter's teardown); ``inject`` is Python
    run before the CLI starts (to plant a bug)."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    code = f"{inject}\nfrom onnxflex.cli import run\nrun()"  # the console script's entry point
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("command", [
    ["quantize", "MISSING", "-o", "OUT"],
    ["inspect", "MISSING"],
    ["compare", CNN, "MISSING", "--data", EVAL],
    ["check", "MISSING"],
])
def test_bad_input_exits_2_in_one_line(tmp_path, command):
    args = [tmp_path / "nope.onnx" if a == "MISSING" else tmp_path / "out.onnx" if a == "OUT" else a
            for a in command]
    done = run_cli(tmp_path, *args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    one_line_error(done, "error: ", "nope.onnx", "does not exist")
    assert not (tmp_path / "out.onnx").exists()


def test_bad_options_exit_2(tmp_path):
    config = run_cli(tmp_path, "quantize", CNN, "--wbits", "9", "-o", tmp_path / "out.onnx")
    assert config.returncode == 2, config.stderr
    one_line_error(config, "wbits=9")
    usage = run_cli(tmp_path, "quantize", CNN, "--method", "magic")
    assert usage.returncode == 2, usage.stderr


# A bug planted in each command's entry point, where the CLI calls into the library.
BUGS = {
    "quantize": ("onnxflex.api", "quantize", ["quantize", CNN, "-o", "OUT"]),
    "inspect": ("onnxflex.pipeline", "plan", ["inspect", CNN]),
    "compare": ("onnxflex.compare", "compare_models", ["compare", CNN, CNN, "--data", EVAL]),
    "check": ("onnxflex.check", "check", ["check", CNN]),
}


@pytest.mark.parametrize("command", sorted(BUGS))
def test_internal_error_exits_3_with_the_traceback_in_a_log(tmp_path, command):
    module, function, args = BUGS[command]
    inject = (f"import {module} as m\n"
              "def planted(*a, **k):\n    raise TypeError('len() of unsized object')\n"
              f"m.{function} = planted")
    args = [tmp_path / "out.onnx" if a == "OUT" else a for a in args]
    done = run_cli(tmp_path, *args, inject=inject)
    assert done.returncode == 3, (done.returncode, done.stderr)
    line = one_line_error(done, "internal error: TypeError: len() of unsized object", "bug in onnxflex")
    log = Path(re.search(r"traceback is in (\S+)", line).group(1))
    assert log.parent == tmp_path / "tmp" and log.is_file(), line
    text = log.read_text()
    assert "Traceback" in text and "planted" in text, text


def test_verification_failure_is_a_failed_check_exit_1(tmp_path):
    inject = ("import onnxflex.api as m\nfrom onnxflex.errors import VerificationError\n"
              "def planted(*a, **k):\n    raise VerificationError('onnxruntime vs simulation SQNR 3.0 dB < 30 dB')\n"
              "m.quantize = planted")
    done = run_cli(tmp_path, "quantize", CNN, "-o", tmp_path / "out.onnx", inject=inject)
    assert done.returncode == 1, (done.returncode, done.stderr)
    one_line_error(done, "error: ", "SQNR 3.0 dB")


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_quantize_removes_the_spill_folder(tmp_path, signum, code):
    """A run whose capture spills to disk (--max-cache-mb 1), stopped while it reconstructs."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "q.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnxflex.cli", "quantize", str(CNN), "-o", str(out),
                             "--max-cache-mb", "1", "--iters", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    try:
        deadline = time.monotonic() + 240
        while not list(tmp.glob("onnxflex-cache-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        spilled = list(tmp.glob("onnxflex-cache-*"))
        assert spilled and list(spilled[0].iterdir()), f"no spill files: {proc.poll()} {list(tmp.iterdir())}"
        time.sleep(1.0)  # into reconstruction
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, (proc.returncode, stderr)
    left = [p.name for p in tmp.iterdir() if p.name.startswith("onnxflex-")]
    assert not left, f"left behind: {left}"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".q.onnx")]
    assert "temporary files removed" in stderr.splitlines()[-1], stderr


def test_gate_failure_is_1_and_ok_is_0(tmp_path):
    np.savez(tmp_path / "few.npz", input=np.load(EVAL)["input"][:16])
    ok = run_cli(tmp_path, "compare", CNN, CNN, "--data", tmp_path / "few.npz", "--repeats", "2", "--min-sqnr", "99")
    assert ok.returncode == 0, ok.stderr
    check = run_cli(tmp_path, "check", CNN, "--static-only")  # a float model: every layer falls back
    assert check.returncode == 1, check.stdout + check.stderr


def test_the_prompt_exit_runs_atexit_handlers_and_flushes_what_was_printed(tmp_path):
    """cli.run ends the process without the interpreter's teardown (exits.exit_promptly), after the atexit
    handlers (temporary folders are removed by them) and with stdout and stderr flushed into a pipe."""
    marker = tmp_path / "atexit-ran"
    inject = f"import atexit, pathlib\natexit.register(pathlib.Path({str(marker)!r}).write_text, 'ran')"
    done = run_cli(tmp_path, "quantize", "--help", inject=inject)
    assert done.returncode == 0 and "--calib" in done.stdout and done.stdout.endswith("\n"), done
    assert marker.read_text() == "ran"
    inject = "import sys\nsys.argv[1:] = ['--version']\nimport click\nclick.echo('x' * 200000, nl=False)"
    done = run_cli(tmp_path, inject=inject)
    assert done.returncode == 0 and done.stdout.startswith("x" * 200000) and "version" in done.stdout, \
        (done.returncode, len(done.stdout), done.stdout[-80:])


def test_the_prompt_exit_keeps_sys_exit_codes_and_messages(tmp_path):
    for code, expected, message in ((None, 0, ""), (0, 0, ""), (4, 4, ""), ("went wrong", 1, "went wrong")):
        inject = f"from onnxflex import exits\nexits.exit_promptly({code!r})"
        done = run_cli(tmp_path, inject=inject)
        assert done.returncode == expected and done.stderr.strip() == message, (code, done.returncode, done.stderr)
