"""Keep freed heap pages in the process while a block learns, so that a step's tensors reuse the memory
the previous step freed instead of page-faulting fresh pages in.

glibc's malloc serves an allocation above M_MMAP_THRESHOLD with its own mmap and unmaps it on free, and
returns the top of the heap to the kernel once more than M_TRIM_THRESHOLD of it is free. A training step
allocates and frees the same few megabyte-sized activations every step, so with those defaults each step
touches new pages (a minor fault and a zeroed page each). Inside ``reused_pages()`` both thresholds are
raised; on exit they are set back to glibc's documented defaults and the kept pages are handed back
(malloc_trim), so memory outside the loop is what it was. Setting a threshold turns off glibc's own
adjustment of it for the rest of the process; outside the context the defaults then hold, as they do
from the start of every process.

Where the C library is not glibc (macOS, musl, Windows) it does nothing. It changes where memory comes
from, never what is computed: results are bit for bit the same with and without it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
from contextlib import contextmanager

# mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024}
# glibc refuses an mmap threshold above half its largest heap (32 MiB on 64-bit): larger blocks still mmap
KEEP = {M_TRIM_THRESHOLD: 1 << 30, M_MMAP_THRESHOLD: 32 * 1024 * 1024}

_depth = 0


def _libc():
    """glibc as a ctypes library, or None where the C library is another."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both must exist)
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def reused_pages():
    """Within it, freed memory stays in the process (glibc only; elsewhere a no-op). Nested uses keep
    the outermost's settings; the outermost restores the defaults and trims the heap on exit, also when
    the body raises."""
    global _depth
    libc = _libc() if _depth == 0 else None
    if libc is not None:
        for param, value in KEEP.items():
            libc.mallopt(param, value)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if libc is not None:
            for param, value in DEFAULTS.items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)
