"""`PollMixin`: what the coordinator reads off its actors for metrics and reports --
their call timings and CPU account, and their ledgers -- a part of `RayExecutor`
(ray_executor.py).

An actor answers a call only after the calls issued to it before, so a poll that waits
for its answers waits for every batch issued ahead of it: the pipeline drains, and the
next batch starts only after.  Between training steps the metrics ask without waiting
(`ask_timings`) and read the answers at their next poll (`asked_timings`), by when the
later batches' replies have come, so the answers have too.  Reads that a report or an
evaluation makes (which drain anyway) wait (`stage_timings`, `ledger`).
"""

from __future__ import annotations

from collections import Counter

from ..ledger import Ledger
from ..timing import cpu_parts
from .executor_state import recovering


class PollMixin:
    """Mixed into `RayExecutor`, which provides workers, local, _get, _ledger and
    _cpu_taken."""

    def _took(self, timings: list[dict]) -> None:
        """Timings that cleared their actors' counters join the run's CPU account."""
        for t in timings:
            self._cpu_taken.update(cpu_parts(t))  # a Counter: adds

    @recovering
    def stage_timings(self, clear: bool = True) -> list[dict]:
        """Per stage, `StageWorker.timings()`: call times since the last call (metrics).
        What a clearing call takes is added to the run's CPU account (`actor_cpu_s`)."""
        self.asked_timings()  # (an unread ask cleared counters: they still count)
        out = self._get([w.timings.remote(clear) for w in self.workers], "timings")
        if clear:
            self._took(out)
        return out

    def ask_timings(self) -> None:
        """Ask every actor for its timings (clearing them) and its ledger, without
        waiting; `asked_timings` reads the answers.  An ask not yet read is read first."""
        self.asked_timings()
        self._asked = [w.timings.remote(True, True) for w in self.workers]

    def asked_timings(self) -> tuple[list[dict], Ledger] | None:
        """The answers to the last `ask_timings`: per stage its timings, and the merged
        ledger.  None when nothing was asked, or when an actor died since: its answers
        died with it, and the window is lost to the metrics and the CPU account."""
        asked, self._asked = getattr(self, "_asked", None), None
        if asked is None:
            return None
        try:  # never a recovery here: the next training call makes it
            timings = self._get(asked, "timings")
        except Exception:  # noqa: BLE001 - an actor that died took its answers with it
            return None
        ledgers = [t.pop("ledger") for t in timings]
        self._took(timings)
        return timings, Ledger.merged([self._ledger, *ledgers])

    def actor_cpu_s(self) -> dict:
        """The actors' main-thread CPU seconds so far, summed over actors, by part
        (`timing.cpu_parts`): what metrics polls took, plus what is not yet taken."""
        self.asked_timings()
        total = Counter(self._cpu_taken)
        try:  # a report: never a recovery, and actors that are gone just add nothing
            fresh = self._get([w.timings.remote(False) for w in self.workers], "timings")
        except Exception:  # noqa: BLE001
            fresh = []
        for t in fresh:
            total.update(cpu_parts(t))
        return dict(total)

    @recovering
    def ledger(self) -> Ledger:
        return Ledger.merged([self._ledger, *self._actor_ledgers()])

    def _actor_ledgers(self) -> list[dict]:
        """Every actor's ledger (what it sent since it was set up, or since the last
        recovery: recovery.py, `_rewind_ledgers`)."""
        return self._get([w.ledger.remote() for w in self.workers], "ledger")
