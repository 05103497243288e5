"""Keep freed memory in the process, so training steps stop page-faulting.

glibc's malloc serves blocks above M_MMAP_THRESHOLD (128 KiB to start) with a fresh
mmap and unmaps them on free, and trims the heap top back to the OS above
M_TRIM_THRESHOLD.  A training step frees and reallocates the same activation-sized
buffers (a ResNet-20 conv output at batch 128 is 8 MiB) every step.  So every step pays
page faults to zero those pages again: a sizeable share of a CPU step, more for rules
that allocate a little more (PFA's W_eff).  `benchmarks/RESULTS.md`, rule_cost, has the
numbers.

`keep_freed_memory()` raises both thresholds with mallopt.  Freed blocks then stay in
the process for reuse, and its footprint stays at its peak.  Called by `localnet.train`
and by every stage actor.  It is a no-op off glibc.  Set LOCALNET_KEEP_FREED_MEMORY=0 to
leave malloc alone.  `heap_mb()` says how much of that footprint is live and how much is
kept free (what a step's peak needs on top of what lives between steps).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# mmap only above 1 GiB; older glibc caps the threshold at 32 MiB (HEAP_MAX / 2 on
# 64-bit) and refuses more, so that is the fallback
MMAP_THRESHOLDS = (1 << 30, 32 << 20)

_done: bool | None = None


def _glibc_function(name: str):
    """A function of the C library, or None off Linux or where it lacks it (musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when they are set."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("LOCALNET_KEEP_FREED_MEMORY", "1") == "0":
        return False
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap = any(mallopt(M_MMAP_THRESHOLD, v) == 1 for v in MMAP_THRESHOLDS)
    _done = mmap and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    return _done


def release_free_memory() -> None:
    """Give the memory malloc holds free back to the OS (glibc's malloc_trim), once a
    peak the process will not see again is over -- an actor's set-up, which builds its
    units and their dry forward, before training's own steady peak.  A no-op off glibc."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


class _Mallinfo2(ctypes.Structure):
    # glibc >= 2.33's struct mallinfo2: every field a size_t
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_mb() -> dict | None:
    """malloc's books for this process, in MiB (glibc's mallinfo2; None off glibc or
    before 2.33): `live` in use, `kept` freed but held for reuse, `mapped` in blocks of
    their own mmap.  With `keep_freed_memory`, live + kept is the process's peak."""
    fn = _glibc_function("mallinfo2")
    if fn is None:
        return None
    fn.argtypes, fn.restype = [], _Mallinfo2
    m = fn()
    mib = float(1 << 20)
    return {"live": round((m.uordblks + m.hblkhd) / mib, 1), "kept": round(m.fordblks / mib, 1),
            "mapped": round(m.hblkhd / mib, 1)}
