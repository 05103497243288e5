"""The dry run: a schedule's makespan, bubbles, peak activations and deadlocks.

Dependencies between stages:

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
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from .base import B, F, Action, Schedule, _graph, check_schedule, consumers


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
             feed: int | None = None, ahead: int = 0) -> SimResult:
    """Dry-run a schedule as the runtime runs it: each stage works through its own list
    (`interpreter.py`); an action starts when its stage is free and every action it
    depends on is done (+comm_cost for a message from another stage).

    fwd_cost, bwd_cost, step_cost: per stage, a list or one number for all stages
    (time per micro-batch).  hop_cost: CPU seconds the data plane spends on one message
    from another stage (frame, payload, receive), charged to the action that receives
    it -- per stage, one number, or a function (src, dst, op) -> seconds like comm_cost
    (a message's CPU grows with its payload); `benchmarks/dataplane.py` measures it.  call_cost:
    the coordinator's one call per stage per batch, charged before the stage's first
    action.  comm_cost: seconds a message takes between stages, one number, or a
    function (src, dst, op) -> seconds, op "F" for an activation and "B" for an error.
    cores: at most this many actions run at once (actors sharing a machine with fewer
    cores than actors); None: every actor has its own.  feed: micro-batches come in
    batches of `feed`, and the coordinator feeds batch b once the last stage has done
    batch b-1-ahead's last forward (its call returns with the loss; `AsyncStream.take`;
    ahead: batches issued before that loss is back, the async schedule's `ahead`) -- a
    streamed async schedule; None: every micro-batch
    is there from the start.  Raises DeadlockError when no stage can progress.
    """
    check_schedule(schedule)
    S, M = schedule.num_stages, schedule.micro_batches
    graph = _graph(S, schedule.graph)
    cons = consumers(graph)
    fc, bc, sc, cc = (_per_stage(c, S, n) for c, n in (
        (fwd_cost, "fwd_cost"), (bwd_cost, "bwd_cost"), (step_cost, "step_cost"),
        (call_cost, "call_cost")))
    if callable(hop_cost):
        hop = hop_cost
    else:
        hc = _per_stage(hop_cost, S, "hop_cost")
        hop = lambda src, dst, op: hc[dst]  # noqa: E731 - charged to the receiver
    acts = schedule.stages

    def needs(s, a):
        return _deps(s, a, S, M, dfa, graph, cons)

    if ahead < 0:
        raise ValueError(f"ahead must be >= 0, got {ahead}")

    def fed(s, a):  # the last forward on the last stage of the batch `ahead` before the
        # previous one: then the driver's step returns, and it feeds this batch
        b = a.mb // feed if feed else 0
        if not feed or -1 not in graph[s] or a.op != "F" or b <= ahead:
            return []
        return [(S - 1, F((b - ahead) * feed - 1))]

    def cost(s, a, deps):
        c = fc[s] if a.op == "F" else bc[s] if a.op == "B" else sc[s]
        return (c + sum(hop(d[0], s, d[1].op) for d in deps if d[0] != s)
                + (cc[s] if ptr[s] == 0 else 0.0))

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
