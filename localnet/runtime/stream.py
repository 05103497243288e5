"""`StreamMixin`: the async schedule's stream, a part of `RayExecutor` (ray_executor.py).

Under `runtime.schedule: async` there is no flush between batches.  Each actor's action
list is an endless stream (`schedules.async_pipe`), cut at batch boundaries: every
`train_step` hands each actor the next piece of its own stream in one call, and returns
as soon as the *last* actor has the batch's loss: its piece ends at the batch's last
forward, and the backward and update of that micro-batch open its next piece
(`AsyncStream.take`), so the first actor's forward of the next batch overlaps them.
Earlier actors still run that batch's backward passes -- their replies are checked later
(`_check_outstanding`).  A flushing schedule's batch returns the same way
(`_last_reply`), so the driver's turn between batches overlaps the first actors' tail.
Anything that reads or writes whole-model state (evaluation, probes, checkpoints) first
drains the stream (`_drain`), so it sees every update the issued batches make.
"""

from __future__ import annotations

from ..engine import StepStats
from ..schedules import stream_staleness
from . import session


class StreamMixin:
    """Mixed into `RayExecutor`, which provides graph, num_stages, micro_batches, local,
    timeout, streamed, _sched, _issue, _gather, _wire_in and _stats_of."""

    def _new_streams(self) -> None:
        depth = stream_staleness(self.graph, self.num_stages)
        start = getattr(self, "_g", 0)
        self._streams = [self._sched.stream(d, start) for d in depth] if self.streamed else []

    def _run_async(self, x, y, step: int, lr: float, wd: float) -> StepStats:
        """Stream one batch into the async pipeline; returns when the last actor has its
        loss.  Each micro-batch's update uses lr and wd/M (M updates make a batch's)."""
        M = min(self.micro_batches, int(x.shape[0]))
        base = self._g
        self._g += M
        for m in range(M):
            self._mb[base + m] = (step, m, float(lr), float(wd) / M)
        last = len(self._streams) - 1  # returns with the loss, before its last backward
        acts = [self._stream_acts(st.take(self._g, to_forward=s == last))
                for s, st in enumerate(self._streams)]
        inputs, targets = self._wire_in(x, y, step, list(range(M)), int(x.shape[0]), "train")
        st = self._last_reply(self._issue(acts, inputs, targets), step)
        for g in [g for g in self._mb if g < base - 2 * (self.num_stages + M)]:
            del self._mb[g]  # every actor is past it (staleness < S)
        return st

    def _last_reply(self, refs: list, step: int) -> StepStats:
        """The batch's stats, as soon as the last actor (the one with the loss) replied;
        the earlier actors' replies are checked later.  An actor runs its calls in
        order, so whatever is issued next starts on each actor right after its part of
        this batch -- the driver's turn between batches overlaps their last backward
        passes and updates instead of leaving the first actors idle."""
        if self.local:
            return self._stats_of(refs[-1])
        self._outstanding += refs[:-1]
        try:
            out = session.get(refs[-1], self.timeout * 1.5 + 10, f"step {step}")
        except BaseException:
            refs, self._outstanding = self._outstanding + [refs[-1]], []
            self._gather(refs, f"step {step}")  # raises the first actor's own error
            raise
        self._check_outstanding()
        return self._stats_of(out)

    def _stream_acts(self, actions) -> list:
        out = []
        for a in actions:
            step, mb, lr, wd = self._mb[a.mb]
            out.append(("S", step, lr, wd) if a.op == "STEP" else (a.op, step, mb))
        return out

    def _check_outstanding(self) -> None:
        """Surface errors of finished async calls without waiting for the rest."""
        if self.local or not self._outstanding:
            self._outstanding = []
            return
        import ray

        ready, rest = ray.wait(self._outstanding, num_returns=len(self._outstanding), timeout=0)
        self._outstanding = rest
        if ready:
            try:
                session.get(ready, self.timeout, f"step {self._step}")
            except BaseException:
                self._outstanding = []
                self._gather(ready + rest, f"step {self._step}")  # the first actor's error
                raise

    def _drain(self) -> None:
        """Finish every issued batch: wait for the replies not yet checked (async: first
        issue the backwards and updates of the micro-batches still in flight)."""
        if self.streamed and self._streams and self._streams[0].start < self._g:
            acts = [self._stream_acts(st.drain(self._g)) for st in self._streams]
            self._outstanding += [r for r in self._issue(acts, {}, {}) if not self.local]
        refs, self._outstanding = self._outstanding, []
        if refs:
            self._gather(refs, "drain")
        if self.streamed:
            self._mb.clear()
