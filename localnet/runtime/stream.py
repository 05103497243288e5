"""`StreamMixin`: how training batches reach the actors, a part of `RayExecutor`
(ray_executor.py) -- a flushing schedule's batch (`_run`), and the async schedule's stream.

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

A batch ahead (the schedule's `ahead`, default 1).  Fed one at a time, the first actor
would still wait, every batch, for the last forward to cross the whole pipeline and the
driver's reply to come back.  So when the caller says which batch it trains next
(`train_step(..., upcoming=...)`: the training loop looks one batch ahead), that batch's
pieces are issued right behind this one's and wait in each actor's queue; its own
`train_step` then only waits for its loss.  Each actor runs the same list in the same
order, so the maths is unchanged.

Two batches per call (`runtime.batches_per_call`).  A flushing schedule uses the same
look-ahead another way: the next batch's lists go in the same calls, right behind this
batch's, so each actor has one call for two batches; the next `train_step` returns the
stats kept for it (`Ahead` with its reply and no calls left).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import StepStats
from ..schedules import stream_staleness
from . import session


@dataclass
class Ahead:
    """A batch issued before its own `train_step`: the calls, or (once a drain waited for
    them) the last actor's reply."""
    step: int
    batch: tuple     # (x, y, lr, wd) as the caller announced them
    refs: list | None
    reply: object = None


class StreamMixin:
    """Mixed into `RayExecutor`, which provides graph, num_stages, micro_batches, local,
    timeout, streamed, flush_name, _sched, _schedule, _issue, _gather, _wire_in and
    _stats_of."""

    def _new_streams(self) -> None:
        depth = stream_staleness(self.graph, self.num_stages)
        start = getattr(self, "_g", 0)
        self._streams = [self._sched.stream(d, start) for d in depth] if self.streamed else []
        self._ahead = None  # a batch issued ahead went with the old streams

    def _run(self, x, y, step: int, step_args: dict | None, schedule: str | None = None,
             then: tuple | None = None) -> StepStats:
        """One batch through a flushing schedule (gpipe / 1f1b); the update only when
        step_args is given (else the gradients stay, for probes).  then: (x, y, lr, wd)
        of step + 1, trained in the same calls right behind this batch
        (`runtime.batches_per_call`); its stats wait in `_ahead` for its own step."""
        if self.streamed or step_args is None:
            self._drain()  # the last training batch's replies may still be outstanding
        name = schedule or self.flush_name
        batches = [(x, y, step, step_args)]
        if then is not None:
            batches.append((then[0], then[1], step + 1, {"lr": then[2], "wd": then[3]}))
        acts: list[list] = [[] for _ in range(self.num_stages)]
        inputs, targets, forwards = {}, {}, []
        for bx, by, bstep, args in batches:  # each actor's lists, one after the other
            M = min(self.micro_batches, int(bx.shape[0]))
            lr, wd = (args or {}).get("lr", 0.0), (args or {}).get("wd", 0.0)
            for mine, stage in zip(acts, self._schedule(name, M).stages):
                mine += [("S", bstep, float(lr), float(wd)) if a.op == "STEP" else
                         (a.op, bstep, a.mb) for a in stage if a.op != "STEP" or args is not None]
            ins, tgs = self._wire_in(bx, by, bstep, list(range(M)), int(bx.shape[0]), "train")
            for s, d in ins.items():  # keyed (step, micro-batch): the batches never collide
                inputs.setdefault(s, {}).update(d)
            targets.update(tgs)
            forwards.append(M)  # the last actor's reply: one stats message per forward
        refs = self._issue(acts, inputs, targets, len(batches) if step_args else 0)
        if step_args is None:
            return self._stats_of(self._gather(refs, f"step {step}")[-1])
        reply = self._last_reply(refs, step)
        if then is not None:
            self._ahead = Ahead(step + 1, tuple(then), None, reply[forwards[0]:])
        return self._stats_of(reply[:forwards[0]])

    def _run_async(self, x, y, step: int, lr: float, wd: float, upcoming=None) -> StepStats:
        """Stream one batch into the async pipeline (unless it was issued ahead), and the
        upcoming one behind it; returns when the last actor has this batch's loss."""
        ahead, self._ahead = self._ahead, None
        refs = ahead.refs if ahead is not None else self._feed(x, y, step, lr, wd)
        if upcoming is not None and self._sched.options.ahead and not self.local:
            ux, uy, ulr, uwd = upcoming
            self._ahead = Ahead(step + 1, tuple(upcoming), self._feed(ux, uy, step + 1, ulr, uwd))
        if ahead is not None and ahead.refs is None:  # a drain already waited for it
            return self._stats_of(ahead.reply)
        return self._stats_of(self._last_reply(refs, step))

    def _check_upcoming(self, step: int, x, y, lr, wd) -> None:
        """Before step `step` starts: if a batch was issued ahead, it must be this one."""
        ahead = getattr(self, "_ahead", None)
        if ahead is not None and not _same(ahead, step, (x, y, lr, wd)):
            raise RuntimeError(f"step {step} is not the batch announced as upcoming at step "
                               f"{ahead.step - 1}: train_step(..., upcoming=) must name the "
                               f"very batch, lr and wd trained next")

    def _feed(self, x, y, step: int, lr: float, wd: float) -> list:
        """Issue one batch's pieces of every actor's stream.  Each micro-batch's update
        uses lr and wd/M (M updates make a batch's)."""
        lr, wd = float(lr), float(wd)
        M = min(self.micro_batches, int(x.shape[0]))
        base = self._g
        self._g += M
        for m in range(M):
            self._mb[base + m] = (step, m, float(lr), float(wd) / M)
        last = len(self._streams) - 1  # returns with the loss, before its last backward
        acts = [self._stream_acts(st.take(self._g, to_forward=s == last))
                for s, st in enumerate(self._streams)]
        inputs, targets = self._wire_in(x, y, step, list(range(M)), int(x.shape[0]), "train")
        refs = self._issue(acts, inputs, targets, 1)
        for g in [g for g in self._mb if g < base - 2 * (self.num_stages + 2 * M)]:
            del self._mb[g]  # every actor is past it (staleness < S, one batch ahead)
        return refs

    def _last_reply(self, refs: list, step: int) -> list:
        """The last actor's reply (its stats messages), as soon as it came;
        the earlier actors' replies are checked later.  An actor runs its calls in
        order, so whatever is issued next starts on each actor right after its part of
        this batch -- the driver's turn between batches overlaps their last backward
        passes and updates instead of leaving the first actors idle."""
        if self.local:
            return refs[-1]
        self._outstanding += refs[:-1]
        try:
            out = session.get(refs[-1], self.timeout * 1.5 + 10, f"step {step}")
        except BaseException:
            refs, self._outstanding = self._outstanding + [refs[-1]], []
            self._gather(refs, f"step {step}")  # raises the first actor's own error
            raise
        self._check_outstanding()
        return out

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
        issue the backwards and updates of the micro-batches still in flight).  A batch
        issued ahead is finished too; its step returns the reply kept here."""
        ahead = getattr(self, "_ahead", None)
        if ahead is not None and ahead.refs is not None:  # (not drained before)
            self._outstanding += ahead.refs
        else:
            ahead = None
        if self.streamed and self._streams and self._streams[0].start < self._g:
            # a drain changes what the next micro-batches compute (async: how stale their
            # weights are), so a recovery's replay must drain here too
            self._replay.drained()
            acts = [self._stream_acts(st.drain(self._g)) for st in self._streams]
            self._outstanding += [r for r in self._issue(acts, {}, {}) if not self.local]
        refs, self._outstanding = self._outstanding, []
        if refs:
            self._gather(refs, "drain")
        if ahead is not None:  # (done: the gather waited for it)
            ahead.reply = session.get(ahead.refs[-1], self.timeout, f"step {ahead.step}")
            ahead.refs = None
        if self.streamed:
            self._mb.clear()


def _same(ahead: Ahead, step: int, batch: tuple) -> bool:
    """Whether (step, batch) is the one issued ahead: the very tensors, lr and wd."""
    x, y, lr, wd = batch
    ax, ay, alr, awd = ahead.batch
    return (ahead.step == step and x is ax and y is ay and float(lr) == float(alr)
            and float(wd) == float(awd))
