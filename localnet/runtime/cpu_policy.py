"""The Linux scheduling policy of an actor's threads (`runtime.cpu_policy`).

On a machine with fewer cores than actors (the 2-core box runs 11 or 20), the kernel
decides which actor computes, and every message wakes threads on the receiving side:
gloo's I/O thread, then the thread waiting for it.

- `normal` (SCHED_OTHER, Linux's default): a woken thread may preempt whatever computes
  on that core, and the fair scheduler also cuts a running computation into slices of a
  few milliseconds whenever others can run.  An actor's convolution is cut short and
  resumes later with its caches refilled by someone else.
- `batch` (SCHED_BATCH): a woken thread no longer preempts on wake-up; it waits for the
  running thread's slice.  The slices remain.
- `rr` (SCHED_RR at the lowest real-time priority, the default): a thread runs until it
  blocks -- on the next message, or at the end of its action -- or until its 100 ms
  round-robin quantum ends, far longer than any action.  So each action of the schedule
  runs to its end on one core with its own caches, and the actors take turns at the
  schedule's own seams.  Messages wait for the core to free up, which costs a little
  latency and no CPU.  (benchmarks/RESULTS.md, "Notes: actors that run their actions
  to the end".)

`rr` needs the kernel's leave: root, CAP_SYS_NICE or an RLIMIT_RTPRIO of at least 1
(`ulimit -r`), and a container whose cgroup grants real-time time.  Without it the
actor falls back to `batch`, which any process may set on its own threads, and says so
(`summary.json`'s `runtime.cpu_policies`, and a note when the run starts).  It also
falls back with several torch threads per actor: OpenMP's idle workers spin before they
sleep, and a spinning real-time thread keeps its core from every other actor; and on
an actor that computes on a GPU (`for_actor`): it waits for its device, and CUDA's and
NCCL's threads may poll while they wait.  The
kernel's real-time throttling (`/proc/sys/kernel/sched_rt_runtime_us`, 95% by default)
leaves the driver, Ray's daemons and everything else on the machine a share of every
core even when the actors could use all of it.  Off Linux this does nothing.
"""

from __future__ import annotations

import os

POLICIES = ("rr", "batch", "normal")


def _kernel(policy: str) -> tuple[int, int]:
    """(the kernel's policy, its priority) for a name of POLICIES."""
    if policy == "rr":
        return os.SCHED_RR, os.sched_get_priority_min(os.SCHED_RR)
    return (os.SCHED_BATCH if policy == "batch" else os.SCHED_OTHER), 0


def apply(policy: str, threads: int = 1) -> str | None:
    """Give every thread of this process `policy` (threads started later inherit it from
    the thread that starts them); `threads`: torch threads of this process.  Returns
    the policy in effect: `rr` falls back to `batch` where the kernel refuses it or
    `threads` > 1 (module docstring); None off Linux."""
    if policy not in POLICIES:
        raise ValueError(f"runtime.cpu_policy: {policy!r} is not one of {POLICIES}")
    if not hasattr(os, "sched_setscheduler") or not os.path.isdir("/proc/self/task"):
        return None
    if policy == "rr" and threads > 1:
        return apply("batch")
    want, prio = _kernel(policy)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), want, os.sched_param(prio))
        except ProcessLookupError:
            pass  # a thread that ended meanwhile
        except PermissionError:
            if policy == "rr":
                return apply("batch")
            # batch and normal need no privilege; a container may still forbid them
    return current()


def openmp_env(threads: int, cpus_each: float, env=os.environ) -> dict:
    """Environment for actors with `threads` torch threads that reserve `cpus_each` CPUs
    each (runtime.threads, runtime.num_cpus).  OpenMP's idle workers spin at every
    operator's barrier before they sleep (libgomp, 300,000 rounds by default), which
    pays where each thread has a core of its own; where several actors' threads share
    the cores, each spin takes the core from an actor with work to do (the main job at
    runtime.threads=2 on 2 cores ran several times slower: benchmarks/RESULTS.md).  So unless each
    actor reserves a CPU per thread, its workers sleep at once (OMP_WAIT_POLICY=PASSIVE),
    and a policy the user set wins.  libgomp reads it as it loads, so it goes in the
    actor's environment, not in its code."""
    if threads > 1 and cpus_each < threads and "OMP_WAIT_POLICY" not in env:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {}


def for_actor(device_type: str, threads: int) -> str | None:
    """Once an actor knows its device and torch threads (setup), which may differ from
    what it started with: rr is for single-threaded actors that compute on the CPU.  One
    on a GPU spends its time waiting for the device, and CUDA's synchronisation and
    NCCL's proxy threads may poll meanwhile; as real-time threads they would keep cores
    from the driver, Ray and the other actors.  Such an actor, or one with several
    threads (`apply`), moves to batch before its data plane starts more threads.
    Returns the policy in effect."""
    if current() == "rr" and (device_type != "cpu" or threads > 1):
        return apply("batch")
    return current()


def current() -> str:
    """This thread's policy, by the names of runtime.cpu_policy (or the kernel's number)."""
    p = os.sched_getscheduler(0)
    return {os.SCHED_RR: "rr", os.SCHED_BATCH: "batch",
            os.SCHED_OTHER: "normal"}.get(p, str(p))
