"""localnet.alloc: glibc keeps freed memory for reuse (once per process, opt-out)."""

import ctypes
import ctypes.util
import sys

import pytest

from localnet import alloc


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(alloc, "_done", None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_thresholds_are_set_once_and_opt_out_is_honoured(fresh, monkeypatch):
    monkeypatch.setenv("LOCALNET_KEEP_FREED_MEMORY", "0")
    assert alloc.keep_freed_memory() is False
    monkeypatch.setattr(alloc, "_done", None)
    monkeypatch.delenv("LOCALNET_KEEP_FREED_MEMORY")
    calls = []
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    real = libc.mallopt
    real.argtypes, real.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int

    class Mallopt:  # records the calls, then makes them
        argtypes = restype = None

        def __call__(self, param, value):
            calls.append((param, value))
            return real(param, value)

    class Libc:
        mallopt = Mallopt()

    monkeypatch.setattr(alloc.ctypes, "CDLL", lambda name: Libc())
    assert alloc.keep_freed_memory() is True
    assert alloc.keep_freed_memory() is True  # once per process
    # the largest mmap threshold this glibc accepts, then the trim threshold
    assert calls[0] == (alloc.M_MMAP_THRESHOLD, alloc.MMAP_THRESHOLDS[0])
    assert calls[-1] == (alloc.M_TRIM_THRESHOLD, 1 << 30) and len(calls) in (2, 3)
