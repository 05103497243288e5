"""The Linux scheduling policy of an actor's threads (`runtime.cpu_policy`).

On a machine with fewer cores than actors, every message wakes threads on both ends: the
receiver's gloo I/O thread, then the thread waiting for it.  Under the default policy
(SCHED_OTHER) a woken thread may preempt whatever computes on that core, so another
actor's convolution is cut short and resumes with its caches refilled by someone else.
SCHED_BATCH marks a thread as throughput work: it never preempts on wake-up and waits
for the running thread's slice instead.  Every actor thread is such work, so the actors
take turns at slice boundaries rather than at every message.  Latency of one message
matters less here than CPU per batch (benchmarks/RESULTS.md, "Notes: actors that take
turns").

An unprivileged process may move its own threads between SCHED_OTHER and SCHED_BATCH
(sched(7)), so this needs no capability; off Linux it does nothing.
"""

from __future__ import annotations

import os

POLICIES = ("batch", "normal")


def apply(policy: str) -> int:
    """Give every thread of this process `policy` (threads started later inherit it from
    the thread that starts them); returns how many threads it set."""
    if policy not in POLICIES:
        raise ValueError(f"runtime.cpu_policy: {policy!r} is not one of {POLICIES}")
    if not hasattr(os, "sched_setscheduler") or not os.path.isdir("/proc/self/task"):
        return 0
    want = os.SCHED_BATCH if policy == "batch" else os.SCHED_OTHER
    done = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), want, os.sched_param(0))
            done += 1
        except (ProcessLookupError, PermissionError):
            pass  # a thread that ended meanwhile; a policy the container forbids
    return done


def current() -> str:
    """This thread's policy, by the names of runtime.cpu_policy (or the kernel's number)."""
    p = os.sched_getscheduler(0)
    return {os.SCHED_BATCH: "batch", os.SCHED_OTHER: "normal"}.get(p, str(p))
