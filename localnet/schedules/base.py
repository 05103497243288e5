"""Pipeline schedules as data: actions, the per-stage lists, and the plugin every
schedule file subclasses.

A schedule is, per stage, an ordered list of actions: `F(mb)` (forward one micro-batch),
`B(mb)` (backward it), `STEP` (step the stage's own optimizer on the whole batch) or
`STEP(mb)` (step on one micro-batch's gradient).  A stage runs its list strictly in
order; an action also waits for its dependencies on other stages (simulator.py says
which).  Stages form a graph (`graph`: per stage its producer stages, -1 for the driver;
default the chain s-1 -> s).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import NoOptions, Registry

SCHEDULES = Registry("schedule")


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


# ------------------------------------------------------------------------------ plugins
class PipelineSchedule:
    """One schedule, one file in this package: a subclass with its `name` registers
    itself.  `stages(S, M, graph)` gives each stage's action list for one batch of M
    micro-batches.

    Capabilities, which the executors read instead of the schedule's name:
      streamed    the runtime streams the lists across batches without a flush
                  (`stream(d)`: one stage's endless list), so updates run per micro-batch
      flush_with  a streamed schedule's flushing counterpart, for the passes that must
                  not update (evaluation, probes)
    """

    name: str = ""
    Options = NoOptions
    streamed: bool = False
    flush_with: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        SCHEDULES.add(cls)

    def __init__(self, **options):
        self.options = SCHEDULES.options(self.name, options, "runtime.schedule")

    def stages(self, S: int, M: int, graph: list[list[int]]) -> list[list[Action]]:
        raise NotImplementedError

    def stream(self, d: int, start: int = 0):
        raise TypeError(f"schedule {self.name!r} is not streamed")


def make_schedule(name: str, S: int, M: int, graph=None, **options) -> Schedule:
    """The schedule registered as `name`, for S stages (on `graph`, default a chain) and
    M micro-batches per batch."""
    _check(S, M)
    g = _graph(S, graph)
    stages = SCHEDULES.get(name)(**options).stages(S, M, g)
    return Schedule(name, stages, M, None if graph is None else g)


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
