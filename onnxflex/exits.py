"""Exit codes of every command, and the wrapper that turns what a command raises into one.

    0    ok
    1    a gate or check found what it was asked to find (compare's gates, check's fallbacks, an
         emitted model that fails verification)
    2    usage or bad input: an OnnxflexError (bad model, config, calibration, output path) or a click
         usage error, reported in one line that names the thing and the fix
    3    internal error: an unexpected exception; its traceback goes to a log file whose path is
         printed with a one-line summary
    130  interrupted by SIGINT; 143 by SIGTERM (what CI's timeout sends). Both unwind the command
         like an exception, so spill folders and temporary outputs are removed on the way out.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

OK, FAILED, BAD_INPUT, INTERNAL = 0, 1, 2, 3
SIGINT_EXIT, SIGTERM_EXIT = 130, 143
LOG_DIR_ENV = "ONNXFLEX_LOG_DIR"  # where crash logs go [default: the temporary folder]


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives, so that ``finally`` blocks and context managers
    (the capture cache, atomic writes) clean up as they do for KeyboardInterrupt. A BaseException, so
    that no ``except Exception`` in the code swallows it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_unwinds():
    """While inside, SIGTERM raises Terminated instead of killing the process outright. Restores the
    previous handler on the way out; does nothing outside the main thread (signals cannot be set there)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def crash_log(exc: BaseException, command: str) -> Path:
    """Writes ``exc``'s traceback to a new log file (in $ONNXFLEX_LOG_DIR, else the temporary folder)
    and returns its path."""
    folder = Path(os.environ.get(LOG_DIR_ENV) or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fd, name = tempfile.mkstemp(prefix=f"onnxflex-{command}-{stamp}-", suffix=".log", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(f"onnxflex {command}: internal error\n\n")
        f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return Path(name)


def internal_error_line(exc: BaseException, log: Path) -> str:
    """The one line printed for an unexpected exception."""
    summary = str(exc).splitlines()[0] if str(exc) else ""
    return (f"internal error: {type(exc).__name__}{': ' + summary if summary else ''} — this is a bug in "
            f"onnxflex, not in your input; the traceback is in {log} (please attach it to a report)")


def exit_promptly(code: int | str | None) -> NoReturn:
    """Ends the process with ``code`` as ``sys.exit`` would (None: 0; a message: printed to stderr, 1) after
    what a normal exit does that a finished command needs: the atexit handlers run (temporary folders,
    logging's flush) and stdout and stderr are flushed. It skips the interpreter's teardown of every module
    and the libraries' static destructors: once torch is imported that alone takes 0.35 s on a 2-core
    machine, on every command."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = FAILED
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
                pass
        os._exit(code or OK)
