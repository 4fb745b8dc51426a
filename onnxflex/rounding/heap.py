"""Keep freed heap pages in the process while blocks are learned and run, so that a step's tensors reuse
the memory the previous step freed instead of page-faulting fresh pages in.

glibc's malloc serves an allocation above M_MMAP_THRESHOLD with its own mmap and unmaps it on free, and
returns the top of the heap to the kernel once more than M_TRIM_THRESHOLD of it is free. A training step
allocates and frees the same few megabyte-sized activations every step, so with those defaults each step
touches new pages (a minor fault and a zeroed page each). glibc raises both thresholds by itself once
it sees large blocks freed, up to 32 MiB (mmap) and 64 MiB (trim), but a step's larger tensors and a
heap top trimmed between steps still fault. Inside ``reused_pages()`` the trim threshold is 1 GiB and
no allocation is served by mmap (M_MMAP_MAX 0): glibc refuses an mmap threshold above 32 MiB, and a
detector's 32-sample activations (48x80x80 floats: 39 MB) each faulted in anew, 0.5 s per copy of a
batch of block inputs on the 2-core machine against 2 ms into memory already touched. On exit the
thresholds are set to ``AFTER``, glibc's own ceilings, and mmap is allowed again: setting a threshold
turns off its adjustment for the rest of the process, and going back to the fixed 128 KiB start values
(then trimming) made the next block fault its heap in again: on the Paddle classifier of BENCHMARKS.md
that measured 12,836 faults and 579 ms per step summed over its 25 blocks, against 3,770 and 532 ms
with these (14,731 and 644 ms without any of this). Memory outside the loop then keeps at most 64 MiB
of free heap top, which glibc's own adjustment also allows.

Between blocks, ``trim_freed()`` gives the free heap back to the kernel once it exceeds TRIM_ABOVE:
blocks with big weights free more than any step reuses (a 6-layer 4096x4096 MLP at W4 rtn: 1.9 GiB
resident after its six blocks, 0.2 GiB of it live). Models whose blocks free less keep their pages.

A run that learns on a model which keeps its weights on disk (larger than RAM) is bounded by memory,
not by page faults: there ``reused_pages(bounded=True)`` serves every allocation of BOUNDED_MMAP or
more by mmap again, so that a freed weight-sized tensor goes back to the kernel at once. Kept in the
heap, the freed pieces of such a block (a 1024-wide decoder layer at W4, FlexRound: its weight-sized
temporaries of 11.5 MB) left it 1.44 GiB resident after one block whose live peak was 0.71 GiB; with
them mmapped, 0.89 GiB.

``small_pages()`` turns off numpy's transparent huge page advice for a run: numpy asks the kernel for
huge pages (madvise) on every array of 4 MiB or more, and where the kernel then compacts memory to find
them (the common THP setting "madvise" with defrag "madvise") the first touch of a fresh array stalls.
On the 2-core machine ddddocr_det --preset fast wrote its 1.09 GB of capture and quantized-path rows in
1.34 s with the advice and in 0.32 s without it (the whole run 11.1 -> 9.4-10.1 s, same bytes).

Where the C library is not glibc (macOS, musl, Windows) the malloc settings do nothing. It changes where memory comes
from, never what is computed: results are bit for bit the same with and without it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from contextlib import contextmanager

import numpy as np

# mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
# glibc refuses an mmap threshold above half its largest heap (32 MiB on 64-bit): no mmap at all instead
KEEP = {M_TRIM_THRESHOLD: 1 << 30, M_MMAP_THRESHOLD: 32 << 20, M_MMAP_MAX: 0}
# glibc's DEFAULT_MMAP_THRESHOLD_MAX and 2x, and its default count of mmapped blocks (DEFAULT_MMAP_MAX)
AFTER = {M_TRIM_THRESHOLD: 64 << 20, M_MMAP_THRESHOLD: 32 << 20, M_MMAP_MAX: 65536}
BOUNDED_MMAP = 4 << 20
BOUNDED = {M_TRIM_THRESHOLD: 64 << 20, M_MMAP_THRESHOLD: BOUNDED_MMAP, M_MMAP_MAX: 65536}

TRIM_ABOVE = 256 << 20  # free heap bytes beyond which trim_freed() gives pages back

_depth = 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc():
    """glibc as a ctypes library, or None where the C library is another."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  (must exist)
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def reused_pages(bounded: bool = False):
    """Within it, freed memory stays in the process (glibc only; elsewhere a no-op); ``bounded``: only
    allocations under BOUNDED_MMAP do (BOUNDED). Nested uses keep the outermost's settings; the
    outermost sets ``AFTER`` on exit, also when the body raises."""
    global _depth
    libc = _libc() if _depth == 0 else None
    if libc is not None:
        for param, value in (BOUNDED if bounded else KEEP).items():
            libc.mallopt(param, value)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if libc is not None:
            for param, value in AFTER.items():
                libc.mallopt(param, value)


@contextmanager
def small_pages():
    """Within it numpy gives the kernel no huge page advice for new arrays, unless the caller chose with
    NUMPY_MADVISE_HUGEPAGE (numpy's own switch, read when numpy is imported); the previous setting is
    back on exit, also when the body raises. A no-op on a numpy without the switch."""
    core = getattr(np, "_core", None) or np.core  # numpy 2, numpy 1
    switch = getattr(core.multiarray, "_set_madvise_hugepage", None)
    if switch is None or "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        yield
        return
    before = switch(False)
    try:
        yield
    finally:
        switch(before)


def trim_freed(limit: int = TRIM_ABOVE) -> bool:
    """When glibc's main heap holds more than ``limit`` free bytes, give the free pages of every heap back
    to the kernel (malloc_trim), inside ``reused_pages()`` too (between blocks, not steps); returns
    whether it trimmed. A no-op elsewhere, and where glibc is older than 2.33 (no mallinfo2)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return False
    libc.mallinfo2.restype = _MallInfo2
    if libc.mallinfo2().fordblks <= limit:
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True
