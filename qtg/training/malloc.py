"""Keep freed memory in the process (glibc malloc settings for training steps), or give it back at once.

A QTG training step allocates and frees many ``[B, H, N, N]`` temporaries of
several MiB. glibc serves blocks that large with ``mmap`` and returns them with
``munmap`` (or trims the heap top once more than ``M_TRIM_THRESHOLD`` is free),
so every step faults the same pages in again: ~96,000 minor page faults per
nano step (B = 16, N = 256), a large share of its time spent in the kernel.
:func:`keep_freed_memory` raises both thresholds, so freed blocks stay in the
heap and the next step reuses them (benchmarks/bench_speed.py measures the
faults with ``resource.getrusage``). The cost is that the process keeps its
peak heap instead of returning it to the system.

The same settings from the shell, for any process (glibc reads them at start-up)::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_MMAP_MAX_=0 python ...

Blocks above 32 MiB (glibc's largest mmap threshold on 64-bit) would still be
mapped and unmapped each time; ``M_MMAP_MAX = 0`` (no mmapped blocks at all)
serves them from the heap as well.

The other way round, :func:`release_freed_memory` returns what was freed to the
system now (``malloc_trim``): the app calls it once a model is unloaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 4 * 2**30

_applied = False


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Hand the memory this process has freed back to the system now (glibc ``malloc_trim(0)``).

    Freed blocks below glibc's mmap threshold stay in the heap of the thread's arena that allocated them,
    and a heap is trimmed only from its top: after a model is dropped, the process would keep its size.
    ``malloc_trim`` returns every free page of every arena (glibc 2.8+). For after a model is unloaded.

    Returns:
        True where glibc's ``malloc_trim`` ran (False on macOS, Windows, musl).
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once; later calls do nothing).

    Returns:
        True if the settings are in effect, False where there is no glibc
        ``mallopt`` (macOS, Windows, musl) or it refused them.
    """
    global _applied
    if _applied:
        return True
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt takes an int: the trim threshold saturates at 2 GiB - 1 there
    trim = min(TRIM_THRESHOLD_BYTES, 2**31 - 1)
    # Blocks of 32 MiB and more (nano's [16, 256, 2048] logits) stay mmapped whatever the threshold;
    # M_MMAP_MAX = 0 serves them from the kept heap too (16,400 -> 1 fault per nano step, measured).
    _applied = (bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, trim))
                and bool(mallopt(M_MMAP_MAX, 0)))
    return _applied
