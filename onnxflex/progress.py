"""Progress for long work: a live line on a terminal, one log line per finished step otherwise."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("onnxflex")


class Progress:
    """``start(total, what)``, ``update(done, note)``, ``finish(summary)``; silent when disabled."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._what, self._total, self._t0, self._last = "", 0, 0.0, 0.0

    def start(self, total: int, what: str) -> None:
        self._what, self._total, self._t0, self._last = what, total, time.perf_counter(), 0.0

    def update(self, done: int, note: str = "") -> None:
        if not self.live:
            return
        now = time.perf_counter()
        if done < self._total and now - self._last < 0.1:
            return
        self._last = now
        width = 24
        filled = int(width * done / max(self._total, 1))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self._what} [{bar}] {done}/{self._total} {note}\033[K")
        self.stream.flush()

    def finish(self, summary: str, seconds: float | None = None) -> None:
        """Logs ``summary`` with the time since ``start``, or ``seconds`` when given (work done elsewhere)."""
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
        if self.enabled:
            log.info("%s (%.1fs)", summary, time.perf_counter() - self._t0 if seconds is None else seconds)
