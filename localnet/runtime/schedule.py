"""Pipeline schedules as data, and a dry-run simulator.

A schedule is, per stage, an ordered list of actions: `F(mb)` (forward one micro-batch),
`B(mb)` (backward it), `STEP` (step the stage's own optimizer on the whole batch) or
`STEP(mb)` (async: step on one micro-batch's gradient).  A stage runs its list strictly in
order; an action also waits for its dependencies on other stages.  Stages form a graph
(`graph`: per stage its producer stages, -1 for the driver; default the chain s-1 -> s):

    F(s, mb)  needs  F(p, mb) for every producer p           (the activations)
    B(s, mb)  needs  F(s, mb)  and  B(c, mb) for every consumer c   (the projected errors;
                                                               a producer sums them)
    B(S-1,mb) needs  F(S-1, mb)                          (the last stage owns the loss: its
                                                          forward computes e from the targets)
    STEP(s)   needs  every B(s, mb) of its own stage;  STEP(mb) only B(s, mb)

DFA (`dfa=True`): no error travels down the chain.  Every stage's backward needs only the
output error e of that micro-batch, which the last stage computes in its *forward* F(S-1,
mb) (it holds the targets) and broadcasts.  So B(s, mb) needs F(s, mb) and F(S-1, mb),
not B(s+1, mb) -- we deliberately depend on the last forward rather than the last
backward: e exists as soon as the logits do, and all stages may run their backward
passes at the same time.

Generators: `gpipe(S, M)`, `one_f_one_b(S, M)` (alias `SCHEDULES["1f1b"]`) and
`async_(S, M)` (`"async"`).  gpipe and 1f1b process micro-batches in ascending order on
every stage and step once per batch, so gradients add up in the same order as in the
in-process executor.  async is 1F1B without the flush: stage s warms up with d(s)
forwards (d = edges on the longest path to the last stage), then runs F(m+d) B(m)
STEP(m) -- it updates as soon as micro-batch m's error is in, and its forward of m runs on
weights that miss the updates of the d(s) micro-batches before it (`staleness`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Action:
    op: str          # "F", "B" or "STEP"
    mb: int = -1

    def __post_init__(self):
        if self.op not in ("F", "B", "STEP"):
            raise ValueError(f"unknown action {self.op!r}")
        if self.op != "STEP" and self.mb < 0:
            raise ValueError(f"{self.op} needs a micro-batch index")

    def __str__(self):
        return "STEP" if self.op == "STEP" and self.mb < 0 else f"{self.op}({self.mb})"

    __repr__ = __str__


def F(mb: int) -> Action:  # noqa: N802 - reads like the notation
    return Action("F", mb)


def B(mb: int) -> Action:  # noqa: N802
    return Action("B", mb)


STEP = Action("STEP")


def STEP_MB(mb: int) -> Action:  # noqa: N802 - async: the update from micro-batch mb
    return Action("STEP", mb)


@dataclass
class Schedule:
    name: str
    stages: list[list[Action]]
    micro_batches: int
    graph: list[list[int]] | None = None   # per stage its producers (-1: driver); None: chain

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def per_micro_batch_steps(self) -> bool:
        return any(a.op == "STEP" and a.mb >= 0 for acts in self.stages for a in acts)

    def __str__(self):
        return "\n".join(f"stage{s}: " + " ".join(map(str, acts))
                         for s, acts in enumerate(self.stages))


# ------------------------------------------------------------------------------ graphs
def chain(S: int) -> list[list[int]]:
    return [[s - 1] for s in range(S)]


def consumers(graph: list[list[int]]) -> list[list[int]]:
    """Per stage, the stages that read its output (each once, ascending)."""
    out: list[list[int]] = [[] for _ in graph]
    for c, ins in enumerate(graph):
        for p in ins:
            if p >= 0 and c not in out[p]:
                out[p].append(c)
    return out


def depths(graph: list[list[int]]) -> list[int]:
    """Per stage: edges on the longest path from it to the last stage."""
    cons, d = consumers(graph), [0] * len(graph)
    for s in reversed(range(len(graph) - 1)):
        d[s] = 1 + max((d[c] for c in cons[s]), default=-1)
    return d


def _graph(S: int, graph) -> list[list[int]]:
    g = chain(S) if graph is None else [list(x) for x in graph]
    if len(g) != S:
        raise ValueError(f"graph has {len(g)} stages, schedule {S}")
    for c, ins in enumerate(g):
        if not ins or any(not -1 <= p < c for p in ins):
            raise ValueError(f"graph: stage {c} reads {ins}; stages must be in topological "
                             f"order and read earlier stages or the driver (-1)")
    return g


# ------------------------------------------------------------------------------ generators
def gpipe(S: int, M: int, graph=None) -> Schedule:
    """All forwards, then all backwards (ascending micro-batch), then the step.  The
    last stage runs each backward right after its forward: its error exists as soon as
    its logits do, so there is nothing to wait for and it holds one micro-batch instead
    of M.  Nothing steps before STEP, so the order changes no number."""
    _check(S, M)
    fill_drain = [F(m) for m in range(M)] + [B(m) for m in range(M)] + [STEP]
    last = [a for m in range(M) for a in (F(m), B(m))] + [STEP]
    return Schedule("gpipe", [list(fill_drain) for _ in range(S - 1)] + [last], M,
                    None if graph is None else _graph(S, graph))


def _warm_interleave(S, M, graph, step_each: bool) -> list[list[Action]]:
    d = depths(_graph(S, graph))
    stages = []
    for s in range(S):
        warm = min(d[s], M)
        acts = [F(m) for m in range(warm)]
        f, b = warm, 0
        while f < M:
            acts += [F(f), B(b)] + ([STEP_MB(b)] if step_each else [])
            f, b = f + 1, b + 1
        for m in range(b, M):
            acts += [B(m)] + ([STEP_MB(m)] if step_each else [])
        if not step_each:
            acts.append(STEP)
        stages.append(acts)
    return stages


def one_f_one_b(S: int, M: int, graph=None) -> Schedule:
    """1F1B (PipeDream-flush): stage s warms up with d(s) forwards (S-1-s on a chain),
    then alternates one forward and one backward, then cools down with the remaining
    backwards.  Same math as GPipe; a stage holds at most d(s)+1 micro-batches'
    activations instead of M."""
    _check(S, M)
    return Schedule("1f1b", _warm_interleave(S, M, graph, False), M,
                    None if graph is None else _graph(S, graph))


def async_(S: int, M: int, graph=None) -> Schedule:
    """1F1B with a step after every backward (PipeDream without the flush): F(m+d) B(m)
    STEP(m).  One batch of M here; the executor streams it across batches."""
    _check(S, M)
    return Schedule("async", _warm_interleave(S, M, graph, True), M,
                    None if graph is None else _graph(S, graph))


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "async": async_}


def make_schedule(name: str, S: int, M: int, graph=None) -> Schedule:
    try:
        gen = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None
    return gen(S, M, graph)


def staleness(schedule: Schedule) -> list[int]:
    """Per stage: the most updates that sequential SGD would have applied before some
    micro-batch's forward and this stage had not (0 for gpipe / 1f1b: one update per
    batch, after every micro-batch)."""
    if not schedule.per_micro_batch_steps:
        return [0] * schedule.num_stages
    out = []
    for acts in schedule.stages:
        worst, done = 0, set()
        for a in acts:
            if a.op == "STEP":
                done.add(a.mb)
            elif a.op == "F":
                worst = max(worst, sum(1 for j in range(a.mb) if j not in done))
        out.append(worst)
    return out


def stream_staleness(graph: list[list[int]] | None, S: int) -> list[int]:
    """Per stage, the staleness of the async schedule streamed across batches (no
    flush): d(s), the edges on the longest path from the stage to the last one."""
    return depths(_graph(S, graph))


class AsyncStream:
    """One stage's endless async action list, from micro-batch `start` on:
    F(start) .. F(start+d-1), then F(g+d) B(g) STEP(g) for g = start, start+1, ...

    take(limit): the next actions up to (not including) the first F(g >= limit).
    drain(limit): the remaining B(g) / STEP(g) for g < limit (forwards >= limit are
    dropped), after which the stream restarts at `limit` with a new warm-up."""

    def __init__(self, d: int, start: int = 0):
        self.d = d
        self._restart(start)

    def _restart(self, start: int) -> None:
        self.start = start
        self._it = self._gen(start)
        self._peek = next(self._it)

    def _gen(self, start):
        for g in range(start, start + self.d):
            yield F(g)
        g = start
        while True:
            yield F(g + self.d)
            yield B(g)
            yield STEP_MB(g)
            g += 1

    def take(self, limit: int) -> list[Action]:
        out = []
        while not (self._peek.op == "F" and self._peek.mb >= limit):
            out.append(self._peek)
            self._peek = next(self._it)
        return out

    def drain(self, limit: int) -> list[Action]:
        out = []
        while True:
            a = self._peek
            if a.mb >= limit and a.op != "F":
                break  # B / STEP of micro-batches that never started
            if a.mb < limit:
                out.append(a)
            self._peek = next(self._it)
        self._restart(limit)
        return out


def _check(S, M):
    if S < 1 or M < 1:
        raise ValueError(f"a schedule needs S >= 1 stages and M >= 1 micro-batches, got {S}, {M}")


def check_schedule(schedule: Schedule) -> None:
    """Structural checks: each stage runs every F(mb) and B(mb) exactly once and ends with
    one STEP -- or, with per-micro-batch steps (async), runs STEP(mb) once after each B(mb).
    (Order problems -- a B(mb) before its F(mb), crossed waits between stages -- show up
    as a DeadlockError in `simulate`.)"""
    M = schedule.micro_batches
    each = schedule.per_micro_batch_steps
    for s, acts in enumerate(schedule.stages):
        want = sorted([F(m) for m in range(M)] + [B(m) for m in range(M)])
        got = sorted(a for a in acts if a.op != "STEP")
        if got != want:
            raise ValueError(f"stage{s}: must run F(0..{M - 1}) and B(0..{M - 1}) once each, "
                             f"got {' '.join(map(str, acts))}")
        steps = [a for a in acts if a.op == "STEP"]
        if not each:
            if steps != [STEP] or acts[-1] != STEP:
                raise ValueError(f"stage{s}: must end with exactly one STEP")
            continue
        if sorted(a.mb for a in steps) != list(range(M)):
            raise ValueError(f"stage{s}: must run STEP(0..{M - 1}) once each")
        for a in steps:
            if acts.index(a) < acts.index(B(a.mb)):
                raise ValueError(f"stage{s}: STEP({a.mb}) before B({a.mb})")


# ------------------------------------------------------------------------------ simulator
class DeadlockError(RuntimeError):
    """No action can progress.  `stuck` lists (stage, action, [missing dependencies])."""

    def __init__(self, stuck):
        self.stuck = stuck
        lines = [f"stage{s} {a} waits for " + ", ".join(f"stage{ds} {da}" for ds, da in miss)
                 for s, a, miss in stuck]
        super().__init__("schedule deadlocks:\n  " + "\n  ".join(lines))


def _deps(s, a, S, M, dfa, graph, cons):
    if a.op == "F":
        return [(p, F(a.mb)) for p in graph[s] if p >= 0]
    if a.op == "B":
        deps = [(s, F(a.mb))]
        if s < S - 1:
            if dfa:
                deps.append((S - 1, F(a.mb)))
            else:
                deps += [(c, B(a.mb)) for c in cons[s]]
        return deps
    if a.mb >= 0:
        return [(s, B(a.mb))]
    return [(s, B(m)) for m in range(M)]


@dataclass
class SimResult:
    makespan: float
    busy: list[float]                  # per stage: time spent computing
    bubble_fraction: float             # 1 - sum(busy) / (S * makespan)
    samples_per_s: float | None        # batch_size / makespan, when batch_size is given
    micro_batches_per_s: float
    peak_activations: list[int]        # per stage: most micro-batches held between F and B
    trace: list[tuple[int, Action, float, float]] = field(repr=False, default_factory=list)


def simulate(schedule: Schedule, fwd_cost, bwd_cost, comm_cost=0.0, *,
             step_cost=0.0, hop_cost=0.0, call_cost=0.0, dfa: bool = False,
             batch_size: int | None = None, cores: int | None = None,
             feed: int | None = None) -> SimResult:
    """Dry-run a schedule as the runtime runs it: each stage works through its own list
    (`interpreter.py`); an action starts when its stage is free and every action it
    depends on is done (+comm_cost for a message from another stage).

    fwd_cost, bwd_cost, step_cost: per stage, a list or one number for all stages
    (time per micro-batch).  hop_cost: CPU seconds the data plane spends on one message
    from another stage (frame, payload, receive), charged to the action that receives
    it -- per stage or one number; `benchmarks/dataplane.py` measures it.  call_cost:
    the coordinator's one call per stage per batch, charged before the stage's first
    action.  comm_cost: seconds a message takes between stages, one number, or a
    function (src, dst, op) -> seconds, op "F" for an activation and "B" for an error.
    cores: at most this many actions run at once (actors sharing a machine with fewer
    cores than actors); None: every actor has its own.  feed: micro-batches come in
    batches of `feed`, and the coordinator feeds batch b once the last stage has finished
    batch b-1 (its call returned) -- a streamed async schedule; None: every micro-batch
    is there from the start.  Raises DeadlockError when no stage can progress.
    """
    check_schedule(schedule)
    S, M = schedule.num_stages, schedule.micro_batches
    graph = _graph(S, schedule.graph)
    cons = consumers(graph)
    fc, bc, sc, hc, cc = (_per_stage(c, S, n) for c, n in (
        (fwd_cost, "fwd_cost"), (bwd_cost, "bwd_cost"), (step_cost, "step_cost"),
        (hop_cost, "hop_cost"), (call_cost, "call_cost")))
    acts = schedule.stages
    last_step = {a.mb: a for a in acts[-1] if a.op == "STEP"}

    def needs(s, a):
        return _deps(s, a, S, M, dfa, graph, cons)

    def fed(s, a):  # the previous batch's end on the last stage, when the driver feeds it
        if not feed or -1 not in graph[s] or a.op != "F" or a.mb < feed:
            return []
        prev = a.mb // feed * feed - 1
        return [(S - 1, last_step.get(prev, B(prev)))]

    def cost(s, a, deps):
        c = fc[s] if a.op == "F" else bc[s] if a.op == "B" else sc[s]
        return c + hc[s] * sum(1 for d in deps if d[0] != s) + (cc[s] if ptr[s] == 0 else 0.0)

    end: dict[tuple[int, Action], float] = {}
    ptr, free, busy = [0] * S, [0.0] * S, [0.0] * S
    held, peak, trace = [0] * S, [0] * S, []
    core_free = [0.0] * max(int(cores), 1) if cores is not None else None

    def ready_at(s):
        """When stage s's next action could start, or None (finished, or waiting)."""
        if ptr[s] >= len(acts[s]):
            return None
        a = acts[s][ptr[s]]
        deps, inputs = needs(s, a), fed(s, a)
        if any(d not in end for d in deps + inputs):
            return None
        return max([free[s]] + [end[d] + _comm(comm_cost, d, s) for d in deps]
                   + [end[d] for d in inputs])

    def run(s, start):
        a = acts[s][ptr[s]]
        c = cost(s, a, needs(s, a))
        if core_free is not None:
            heapq.heapreplace(core_free, start + c)
        end[(s, a)] = start + c
        trace.append((s, a, start, start + c))
        if a.op == "F":
            held[s] += 1
            peak[s] = max(peak[s], held[s])
        elif a.op == "B":
            held[s] -= 1
        free[s] = start + c
        busy[s] += c
        ptr[s] += 1

    total = sum(len(a) for a in acts)
    done = 0
    while done < total:
        if core_free is None:  # every stage runs whatever it can, in stage order
            progressed = False
            for s in range(S):
                while (t := ready_at(s)) is not None:
                    run(s, t)
                    done += 1
                    progressed = True
        else:  # list scheduling: next, the ready action that can start earliest
            best = None
            for s in range(S):
                t = ready_at(s)
                if t is not None and (best is None or max(t, core_free[0]) < best[0]):
                    best = (max(t, core_free[0]), s)
            progressed = best is not None
            if progressed:
                run(best[1], best[0])
                done += 1
        if not progressed:
            raise DeadlockError([(s, acts[s][ptr[s]],
                                  [d for d in needs(s, acts[s][ptr[s]]) + fed(s, acts[s][ptr[s]])
                                   if d not in end])
                                 for s in range(S) if ptr[s] < len(acts[s])])
    makespan = max(free) if free else 0.0
    trace.sort(key=lambda t: (t[2], t[3], t[0]))
    bubble = 1.0 - sum(busy) / (S * makespan) if makespan > 0 else 0.0
    return SimResult(
        makespan=makespan, busy=busy, bubble_fraction=bubble,
        samples_per_s=(batch_size / makespan) if (batch_size and makespan > 0) else None,
        micro_batches_per_s=M / makespan if makespan > 0 else float("inf"),
        peak_activations=peak, trace=trace)


def _comm(comm_cost, dep, s: int) -> float:
    """Latency of the message that dependency `dep` (stage, action) sends to stage s."""
    if dep[0] == s:
        return 0.0
    return float(comm_cost(dep[0], s, dep[1].op)) if callable(comm_cost) else comm_cost


def _per_stage(c, S, name):
    if isinstance(c, (int, float)):
        return [float(c)] * S
    c = [float(v) for v in c]
    if len(c) != S:
        raise ValueError(f"{name}: {len(c)} values for {S} stages")
    return c
