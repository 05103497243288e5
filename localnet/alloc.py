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

jemalloc, when it serves the process (Ray ships one; the runtime preloads it into its
actors, `runtime.allocator`), keeps each size class apart, so small blocks never split
a freed activation's block and the footprint stays near the peak of what is live.  Its
`keep_freed_memory` turns its decay off (freed pages are kept for reuse, as glibc's
raised thresholds do); `heap_mb` and `release_free_memory` read and purge its books.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# mmap only above 1 GiB; older glibc caps the threshold at 32 MiB (HEAP_MAX / 2 on
# 64-bit) and refuses more, so that is the fallback
MMAP_THRESHOLDS = (1 << 30, 32 << 20)

_ARENAS_ALL = 4096  # jemalloc's MALLCTL_ARENAS_ALL

_done: bool | None = None
_mallctl = False  # not looked up yet


def _glibc_function(name: str):
    """A function of the C library, or None off Linux or where it lacks it (musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _jemalloc():
    """jemalloc's mallctl when jemalloc serves this process's malloc, else None."""
    global _mallctl
    if _mallctl is False:
        _mallctl = None
        if sys.platform.startswith("linux"):
            fn = getattr(ctypes.CDLL(None), "mallctl", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_size_t]
                fn.restype = ctypes.c_int
                _mallctl = fn
    return _mallctl


def _je_read(name: str, ctype=ctypes.c_size_t):
    value, size = ctype(), ctypes.c_size_t(ctypes.sizeof(ctype))
    if _jemalloc()(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        raise OSError(f"jemalloc: mallctl({name!r}) failed")
    return value.value


def allocator() -> str:
    """Which malloc serves this process: "jemalloc", "glibc" or "other"."""
    if _jemalloc() is not None:
        return "jemalloc"
    return "glibc" if _glibc_function("mallopt") is not None else "other"


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process (under jemalloc: turn its
    decay off); True when they are set."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("LOCALNET_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if _jemalloc() is not None:  # never decay freed pages back to the OS
        never = ctypes.c_ssize_t(-1)

        def never_decay(name: str) -> int:
            return _jemalloc()(name.encode(), None, None, ctypes.byref(never),
                               ctypes.sizeof(never))

        # the default of arenas made later, then every arena made so far (EFAULT: an
        # arena not made yet, which will take the default)
        _done = all(never_decay(f"arenas.{k}_decay_ms") == 0 for k in ("dirty", "muzzy"))
        _done &= all(never_decay(f"arena.{i}.{k}_decay_ms") in (0, errno.EFAULT)
                     for i in range(_je_read("arenas.narenas", ctypes.c_uint))
                     for k in ("dirty", "muzzy"))
        return _done
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap = any(mallopt(M_MMAP_THRESHOLD, v) == 1 for v in MMAP_THRESHOLDS)
    _done = mmap and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    return _done


def release_free_memory() -> None:
    """Give the memory malloc holds free back to the OS (glibc's malloc_trim, jemalloc's
    purge), once a peak the process will not see again is over -- an actor's set-up,
    which builds its units and their dry forward, before training's own steady peak."""
    if _jemalloc() is not None:
        _jemalloc()(f"arena.{_ARENAS_ALL}.purge".encode(), None, None, None, 0)
        return
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
    their own mmap.  With `keep_freed_memory`, live + kept is the process's peak.
    Under jemalloc: live is what is allocated, kept what it holds resident beyond that
    (free pages and its own books), mapped all it has mapped."""
    if _jemalloc() is not None:
        epoch = ctypes.c_uint64(1)  # refreshes the statistics
        _jemalloc()(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
        live, resident = _je_read("stats.allocated"), _je_read("stats.resident")
        mib = float(1 << 20)
        return {"live": round(live / mib, 1), "kept": round(max(resident - live, 0) / mib, 1),
                "mapped": round(_je_read("stats.mapped") / mib, 1)}
    fn = _glibc_function("mallinfo2")
    if fn is None:
        return None
    fn.argtypes, fn.restype = [], _Mallinfo2
    m = fn()
    mib = float(1 << 20)
    return {"live": round((m.uordblks + m.hblkhd) / mib, 1), "kept": round(m.fordblks / mib, 1),
            "mapped": round(m.hblkhd / mib, 1)}
