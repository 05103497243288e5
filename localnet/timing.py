"""`StageTimer`: the time each forward, backward and update of a stage takes;
`machine_cpu_s`: what the whole machine's cores did meanwhile; and `cpu_kind`: which
CPU did it.

Shared by both executors (the in-process run times its stages, each Ray actor its own)
and read by metrics.py, so it lives with neither.
"""

from __future__ import annotations

import os
import platform
import time

from .files import counted, first_few

OPS = ("forward", "backward", "update")
# calls per op kept one by one between two reads: with nobody reading (metrics off), a
# long run would otherwise grow every actor's lists without bound; older calls fold into
# exact sums (`folded`), so the run's CPU account stays whole
KEEP = 4096


class StageTimer:
    """Times one `stage.Stage`: wraps the instance's forward, backward and step (the
    class is untouched).  `take()` returns and clears what was recorded since."""

    def __init__(self, stage):
        self.stage = stage
        self._clear()
        for op, attr in zip(OPS, ("forward", "backward", "step")):
            setattr(stage, attr, self._wrap(op, getattr(stage, attr)))

    def _clear(self) -> None:
        self.times: dict[str, list[float]] = {op: [] for op in OPS}
        # CPU seconds of the calling thread (one torch thread per actor: the compute
        # itself, without the time lost to other processes sharing the core)
        self.cpu: dict[str, list[float]] = {op: [] for op in OPS}
        # calls no longer kept one by one: op -> {"calls", "s", "cpu_s"} summed
        self.folded: dict[str, dict] = {}
        self.samples = 0

    def _fold(self, op: str) -> None:
        """Sum the older half of op's calls into `folded`, keeping the newer ones."""
        n = len(self.times[op]) // 2
        f = self.folded.setdefault(op, {"calls": 0, "s": 0.0, "cpu_s": 0.0})
        f["calls"] += n
        f["s"] += sum(self.times[op][:n])
        f["cpu_s"] += sum(self.cpu[op][:n])
        del self.times[op][:n], self.cpu[op][:n]

    def _wrap(self, op, fn):
        clock, cpu = time.perf_counter, time.thread_time

        def timed(*args, **kwargs):
            t0, c0 = clock(), cpu()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[op].append(clock() - t0)
                self.cpu[op].append(cpu() - c0)
                if len(self.times[op]) > KEEP:
                    self._fold(op)
                if op == "forward" and args:
                    self.samples += int(args[0].shape[0])
        timed.__wrapped__ = fn
        return timed

    def take(self, clear: bool = True) -> dict:
        out = {**{op: list(v) for op, v in self.times.items()},
               **{f"{op}_cpu": list(v) for op, v in self.cpu.items()},
               "folded": {op: dict(f) for op, f in self.folded.items()},
               "samples": self.samples, "gpu_memory_bytes": _gpu_memory()}
        if clear:
            self._clear()
        return out


def _gpu_memory() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.memory_allocated())


def cpu_parts(t: dict) -> dict:
    """A stage's main-thread CPU seconds by part, from its timings: compute always; plane,
    interpreter and calls where a Ray actor kept its account (`StageState.timings`) --
    not in-process, and not in `local` mode, whose queues are not a data plane."""
    out = {"compute": sum(sum(t.get(f"{op}_cpu", ())) for op in OPS)
                      + sum(f["cpu_s"] for f in (t.get("folded") or {}).values())}
    plane = t.get("plane_cpu")
    if plane is not None and t.get("run_cpu") is not None:
        out["plane"] = sum(plane.values())
        # thread_time ticks are exact, but never let rounding export a negative count
        out["interpreter"] = max(t["run_cpu"] - out["compute"] - out["plane"], 0.0)
        out["calls"] = t.get("calls_cpu", 0.0)
    return out


# /proc/stat's first line, in its order; guest time is counted in user already
CPU_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
IDLE_KINDS = ("idle", "iowait")


def machine_cpu_s() -> dict[str, float] | None:
    """The whole machine's CPU seconds since boot by kind (every core, every process,
    the kernel's own work: a message's copies through the kernel land in `system` and
    `softirq`); None without /proc/stat (not Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:1 + len(CPU_KINDS)]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return {k: v / hz for k, v in zip(CPU_KINDS, ticks)}


def busy_s(cpu: dict[str, float] | None) -> float:
    """CPU seconds not idle, of a `machine_cpu_s` reading (or a difference of two)."""
    return sum(v for k, v in (cpu or {}).items() if k not in IDLE_KINDS)


def machine_busy_s() -> float:
    """The machine's CPU seconds not idle since boot (0.0 without /proc/stat): two
    readings apart, what every process on it used in between."""
    return busy_s(machine_cpu_s())


def cpu_since(before: dict | None) -> dict[str, float]:
    """What the machine's cores did since `before` (a `machine_cpu_s` reading), by kind."""
    now = machine_cpu_s()
    if before is None or now is None:
        return {}
    return {k: now[k] - before[k] for k in now}


def cpu_kind() -> dict[str, str]:
    """This machine's CPU as a run records it: {"model", "id", "capability"}.  torch picks
    its kernels by the CPU's instruction set (`capability`: AVX2, AVX512, ...), so one
    command computes the same to the bit on one kind of CPU and differs in the last bits
    on another; a run that blows up grows those bits into other accuracies (RESULTS.md,
    "the same command on two boxes").  `id` tells apart CPUs sold under one name (x86:
    vendor, family, model, stepping)."""
    import torch

    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first core's block names them all
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    ident = [fields.get(k) for k in ("vendor_id", "cpu family", "model", "stepping")]
    return {"model": fields.get("model name") or platform.processor() or platform.machine()
            or "unknown",
            "id": " ".join(f"{k} {v}" for k, v in zip(("vendor", "family", "model",
                                                       "stepping"), ident) if v),
            "capability": torch.backends.cpu.get_cpu_capability()}


def cpu_label(kind: dict | None) -> str:
    """A recorded `cpu_kind` as one line of text; empty for a run from before runs
    recorded it."""
    return f"{kind['model']} ({kind['id']}; {kind['capability']})" if kind else ""


def cpu_kinds(rows: list[dict], name: str) -> list[str]:
    """Where rows (a sweep's or a report's, each with its `cpu_label` under "cpu") ran
    on more than one kind of CPU, a line per kind: its runs, counted and the first few
    named by `name`; else none.  One kind computes a run the same to the bit every
    time, two differ in the last bits, and a run that blows up grows them into
    accuracies far apart, so such runs compare less than their settings say."""
    kinds: dict[str, list[str]] = {}
    for r in rows:
        if r.get("cpu"):
            kinds.setdefault(r["cpu"], []).append(str(r[name]))
    if len(kinds) < 2:
        return []
    return [f"{kind}: {counted(len(names), 'run')} ({first_few(names)})"
            for kind, names in kinds.items()]
