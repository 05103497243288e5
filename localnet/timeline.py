"""`timeline.json`: when each actor ran each of its actions over a few training steps.

The simulator draws the schedule it predicts (`localnet simulate --plot`); this is the
same picture of the actors as they ran: a row per actor, a bar per forward, backward and
update, from the moment its messages were in to the moment its own went out.  The gaps
are where an actor waited -- for a message, for its turn on a shared core, for the
coordinator -- which is what a researcher looks at when a cut or schedule runs slower
than `localnet simulate` says.

Each actor notes its own spans by its wall clock (`interpreter.interpret`), only for the
steps asked for (`metrics.timeline_steps`, after the first `SKIP`, whose start-up costs
are not the run's), so a run pays a clock read per action of those steps and nothing
else.  The coordinator collects them once those steps are flushed and writes
`timeline.json`: {"steps", "schedule", "micro_batches", "actors", "spans": [[actor, op,
step, micro-batch (-1: a batch's update), start s, end s], ...]}, times from the first
span.  Actors on several machines line up as well as their clocks do.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .files import write_json

SKIP = 10  # the first steps: the actors warm up (allocations, caches, the first calls)


def window(done: int, total: int, steps: int) -> tuple[int, int] | None:
    """The steps to note, as the actors number them (the first training step is 1):
    [first, last).  `done`: steps already trained (a resumed run); skips SKIP more when
    the run has them, else takes its last `steps`; None: nothing to note."""
    if steps <= 0 or done >= total:
        return None
    first = done + SKIP if total - done >= SKIP + steps else max(done, total - steps)
    return first + 1, min(first + steps, total) + 1


class Timeline:
    """Arms the actors at the start of training and writes timeline.json once the noted
    steps are flushed (`flushed`).  An executor without actors (in-process) has no
    timeline."""

    def __init__(self, cfg, ex, run_dir, done: int, total: int):
        self.ex, self.cfg, self.path = ex, cfg, Path(run_dir) / "timeline.json"
        self.win = None
        if hasattr(ex, "record_spans"):
            self.win = window(done, total, cfg.metrics.timeline_steps)
        if self.win is not None:
            ex.record_spans(*self.win)

    def flushed(self, done: int) -> None:
        """Every step up to `done` has finished on every actor."""
        if self.win is None or done < self.win[1] - 1:
            return
        first, last = self.win
        self.win = None
        try:
            per_actor = self.ex.spans()
        except Exception as err:  # noqa: BLE001 - a picture, never worth the run
            sys.stderr.write(f"localnet: no timeline.json: the actors' spans could not be "
                             f"collected ({type(err).__name__}: {err})\n")
            return
        spans = sorted(([a, *s] for a, mine in enumerate(per_actor) for s in mine),
                       key=lambda s: s[4])
        t0 = spans[0][4] if spans else 0.0
        write_json(self.path, {
            "steps": [first, last - 1], "schedule": self.cfg.runtime.schedule.name,
            "micro_batches": self.cfg.train.micro_batches,
            "actors": [" ".join(n) for n in self.ex.placement.names],
            "spans": [[a, op, step, mb, s - t0, e - t0] for a, op, step, mb, s, e in spans]})
