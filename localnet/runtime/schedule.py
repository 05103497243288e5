"""Pipeline schedules as data, and a dry-run simulator.

A schedule is, per stage, an ordered list of actions: `F(mb)` (forward one micro-batch),
`B(mb)` (backward it), `STEP` (step the stage's own optimizer).  A stage runs its list
strictly in order; an action also waits for its dependencies on other stages:

    F(s, mb)  needs  F(s-1, mb)                          (the activation)
    B(s, mb)  needs  F(s, mb)  and  B(s+1, mb)           (the projected error), s < S-1
    B(S-1,mb) needs  F(S-1, mb)                          (the last stage owns the loss: its
                                                          forward computes e from the targets)
    STEP(s)   needs  every B(s, mb) of its own stage

DFA (`dfa=True`): no error travels down the chain.  Every stage's backward needs only the
output error e of that micro-batch, which the last stage computes in its *forward* F(S-1,
mb) (it holds the targets) and broadcasts.  So B(s, mb) needs F(s, mb) and F(S-1, mb),
not B(s+1, mb) -- we deliberately depend on the last forward rather than the last
backward: e exists as soon as the logits do, and all stages may run their backward
passes at the same time.

Generators: `gpipe(S, M)` and `one_f_one_b(S, M)` (alias `SCHEDULES["1f1b"]`).  Both
process micro-batches in ascending order on every stage, so gradients add up in the
same order as in the in-process executor.
"""

from __future__ import annotations

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
        return "STEP" if self.op == "STEP" else f"{self.op}({self.mb})"

    __repr__ = __str__


def F(mb: int) -> Action:  # noqa: N802 - reads like the notation
    return Action("F", mb)


def B(mb: int) -> Action:  # noqa: N802
    return Action("B", mb)


STEP = Action("STEP")


@dataclass
class Schedule:
    name: str
    stages: list[list[Action]]
    micro_batches: int

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def __str__(self):
        return "\n".join(f"stage{s}: " + " ".join(map(str, acts))
                         for s, acts in enumerate(self.stages))


# ------------------------------------------------------------------------------ generators
def gpipe(S: int, M: int) -> Schedule:
    """All forwards, then all backwards (ascending micro-batch), then the step."""
    _check(S, M)
    acts = [F(m) for m in range(M)] + [B(m) for m in range(M)] + [STEP]
    return Schedule("gpipe", [list(acts) for _ in range(S)], M)


def one_f_one_b(S: int, M: int) -> Schedule:
    """1F1B (PipeDream-flush): stage s warms up with S-1-s forwards, then alternates one
    forward and one backward, then cools down with the remaining backwards.  Same math as
    GPipe; a stage holds at most S-s micro-batches' activations instead of M."""
    _check(S, M)
    stages = []
    for s in range(S):
        warm = min(S - 1 - s, M)
        acts = [F(m) for m in range(warm)]
        f, b = warm, 0
        while f < M:
            acts += [F(f), B(b)]
            f, b = f + 1, b + 1
        acts += [B(m) for m in range(b, M)]
        acts.append(STEP)
        stages.append(acts)
    return Schedule("1f1b", stages, M)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def make_schedule(name: str, S: int, M: int) -> Schedule:
    try:
        return SCHEDULES[name](S, M)
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None


def _check(S, M):
    if S < 1 or M < 1:
        raise ValueError(f"a schedule needs S >= 1 stages and M >= 1 micro-batches, got {S}, {M}")


def check_schedule(schedule: Schedule) -> None:
    """Structural checks: each stage runs every F(mb) and B(mb) exactly once and ends with
    one STEP.  (Order problems -- a B(mb) before its F(mb), crossed waits between stages --
    show up as a DeadlockError in `simulate`.)"""
    M = schedule.micro_batches
    for s, acts in enumerate(schedule.stages):
        want = sorted([F(m) for m in range(M)] + [B(m) for m in range(M)])
        got = sorted(a for a in acts if a.op != "STEP")
        if got != want:
            raise ValueError(f"stage{s}: must run F(0..{M - 1}) and B(0..{M - 1}) once each, "
                             f"got {' '.join(map(str, acts))}")
        if [a for a in acts if a.op == "STEP"] != [STEP] or acts[-1] != STEP:
            raise ValueError(f"stage{s}: must end with exactly one STEP")


# ------------------------------------------------------------------------------ simulator
class DeadlockError(RuntimeError):
    """No action can progress.  `stuck` lists (stage, action, [missing dependencies])."""

    def __init__(self, stuck):
        self.stuck = stuck
        lines = [f"stage{s} {a} waits for " + ", ".join(f"stage{ds} {da}" for ds, da in miss)
                 for s, a, miss in stuck]
        super().__init__("schedule deadlocks:\n  " + "\n  ".join(lines))


def dependencies(s: int, a: Action, S: int, M: int, dfa: bool = False) -> list[tuple[int, Action]]:
    """(stage, action) pairs that (s, a) waits for, besides its own list order."""
    if a.op == "F":
        return [(s - 1, F(a.mb))] if s > 0 else []
    if a.op == "B":
        deps = [(s, F(a.mb))]
        if s < S - 1:
            deps.append((S - 1, F(a.mb)) if dfa else (s + 1, B(a.mb)))
        return deps
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

    def order(self) -> list[tuple[int, Action]]:
        """A dependency-respecting global order (by start time) in which to issue work."""
        return [(s, a) for s, a, _, _ in self.trace]


def simulate(schedule: Schedule, fwd_cost, bwd_cost, comm_cost: float = 0.0, *,
             step_cost=0.0, dfa: bool = False, batch_size: int | None = None) -> SimResult:
    """Dry-run a schedule: each stage executes its list in order, each action starts when
    its stage is free and its dependencies are done (+comm_cost for one on another stage).

    fwd_cost, bwd_cost, step_cost: per stage, a list or one number for all stages
    (time per micro-batch).  Raises DeadlockError when no stage can progress.
    """
    check_schedule(schedule)
    S, M = schedule.num_stages, schedule.micro_batches
    fc, bc, sc = (_per_stage(c, S, n) for c, n in ((fwd_cost, "fwd_cost"), (bwd_cost, "bwd_cost"),
                                                    (step_cost, "step_cost")))
    end: dict[tuple[int, Action], float] = {}
    ptr = [0] * S
    free = [0.0] * S
    busy = [0.0] * S
    held, peak = [0] * S, [0] * S
    trace = []
    total = sum(len(a) for a in schedule.stages)
    while len(end) < total:
        progressed = False
        for s in range(S):
            while ptr[s] < len(schedule.stages[s]):
                a = schedule.stages[s][ptr[s]]
                deps = dependencies(s, a, S, M, dfa)
                if any(d not in end for d in deps):
                    break
                ready = max([free[s]] + [end[d] + (comm_cost if d[0] != s else 0.0) for d in deps])
                cost = fc[s] if a.op == "F" else bc[s] if a.op == "B" else sc[s]
                end[(s, a)] = ready + cost
                trace.append((s, a, ready, ready + cost))
                free[s] = ready + cost
                busy[s] += cost
                if a.op == "F":
                    held[s] += 1
                    peak[s] = max(peak[s], held[s])
                elif a.op == "B":
                    held[s] -= 1
                ptr[s] += 1
                progressed = True
        if not progressed:
            stuck = []
            for s in range(S):
                if ptr[s] < len(schedule.stages[s]):
                    a = schedule.stages[s][ptr[s]]
                    stuck.append((s, a, [d for d in dependencies(s, a, S, M, dfa) if d not in end]))
            raise DeadlockError(stuck)
    makespan = max(free) if free else 0.0
    trace.sort(key=lambda t: (t[2], t[3], t[0]))
    bubble = 1.0 - sum(busy) / (S * makespan) if makespan > 0 else 0.0
    return SimResult(
        makespan=makespan, busy=busy, bubble_fraction=bubble,
        samples_per_s=(batch_size / makespan) if (batch_size and makespan > 0) else None,
        micro_batches_per_s=M / makespan if makespan > 0 else float("inf"),
        peak_activations=peak, trace=trace)


def _per_stage(c, S, name):
    if isinstance(c, (int, float)):
        return [float(c)] * S
    c = [float(v) for v in c]
    if len(c) != S:
        raise ValueError(f"{name}: {len(c)} values for {S} stages")
    return c
