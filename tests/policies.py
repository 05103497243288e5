"""Scheduling policies in a child process, so the test process keeps its own threads'."""

from __future__ import annotations

import subprocess
import sys


def child(code: str, *args: str) -> list[str]:
    """Run `code` in a fresh interpreter; what it printed, split."""
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def rr_allowed() -> bool:
    """Whether this machine lets a process run its threads SCHED_RR (root, CAP_SYS_NICE
    or RLIMIT_RTPRIO; a container may still refuse)."""
    return child("from localnet.runtime import cpu_policy; print(cpu_policy.apply('rr'))") \
        == ["rr"]
