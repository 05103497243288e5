"""Recovery, a part of the coordinator (`RayExecutor`, ray_executor.py): an actor that
died is recreated in its placement-group bundle, every actor reloads the last
checkpoint, and the steps since then are retrained on the very batches they had, so the
run ends where an uninterrupted one would (exactly once).  The ledger too: it goes
back to the checkpoint's counts, plus the traffic no replay repeats (evaluations,
measuring passes: `keeps_traffic`), so a run's messages.json counts each training
step's messages once, as an uninterrupted run's does -- whichever actor died, and
whatever it had sent since it was last asked.
"""

from __future__ import annotations

import contextlib
import time

from ..ledger import Ledger
from ..schedules import Action, simulate
from . import session
from .messages import MessageError, stage_name
from .session import NoReply
from .worker import StageWorker


class RecoveryMixin:
    """Mixed into `RayExecutor`: workers, timeout, cfg, _placer, _specs, _ckpt,
    _ckpt_step, _replay and the rest come from it."""

    def _cause_order(self, err) -> tuple:
        """Sort key for several actors' errors: the one whose message comes first in the
        schedule is the cause -- actors waiting for a silent peer time out together, and
        every one but the first waits for something that needed the first message."""
        if not isinstance(err, MessageError) or not err.src.startswith("stage"):
            return (-1, 0.0, getattr(err, "t", 0.0))
        src, S = int(err.src[len("stage"):]), self.num_stages
        dfa_e = err.kind == "error" and src == S - 1
        key = (src, Action("F" if err.kind == "activation" or dfa_e else "B", max(err.mb, 0)))
        order = self._order(max(err.mb + 1, self.micro_batches))
        return (err.step, order.get(key, float("inf")), err.t)

    def _order(self, M: int) -> dict:
        """(stage, action) -> when it ends in a dry run of this schedule, unit costs."""
        name = self.flush_name
        res = simulate(self._schedule(name, M), 1.0, 1.0, dfa=self.broadcast_output_error)
        return {(s, a): t1 for s, a, _, t1 in res.trace}

    def _recover(self) -> None:
        """After a failed batch: clear every actor's in-flight state and rebuild the
        plane (best effort: a dead actor is `_revive`'s)."""
        self._new_streams()
        self._ch_now = self.channels  # (what reset leaves every actor with)
        try:
            self._get([w.reset.remote() for w in self.workers], "reset")
            self._open_plane()
        except Exception:  # noqa: BLE001 - the original error is what matters
            pass

    def _forget_echoes(self) -> None:
        """After a failed call, before `_recover`: the calls issued behind it (the batch
        issued ahead, replies not yet checked) fail too, at once, as echoes of its error
        (each actor refuses calls once it failed); take their errors, so Ray does not
        print each actor's traceback as unhandled.  Not after Ctrl-C or SIGTERM: Ray's own
        processes may be gone, and the run must stop in seconds."""
        ahead = getattr(self, "_ahead", None)
        echoes = list(getattr(self, "_outstanding", []))
        echoes += list(ahead.refs) if ahead is not None and ahead.refs else []
        self._outstanding = []
        if echoes and not self.local:
            session.forget(echoes, min(self.timeout, 10.0))

    def _dead(self) -> list[int]:
        """Indices of actors that are gone (RayActorError on a ping)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        dead = []
        refs = [w.ping.remote() for w in self.workers]
        for i, r in enumerate(refs):
            try:
                ray.get(r, timeout=self.timeout)
            except RayActorError:
                dead.append(i)
            except GetTimeoutError:
                raise NoReply(f"{stage_name(i)} does not answer a ping within "
                              f"{self.timeout}s (runtime.timeout_s)") from None
        return dead

    def _rewind_ledgers(self) -> None:
        """Before the replay: every actor's count from zero, the driver's the checkpoint's
        (every actor's then) and what was set apart since.  What the failed attempt sent,
        and the recovery's own setting up, are not counted; the replay counts its steps
        once more, so each is counted once."""
        self._get([w.ledger.remote(clear=True) for w in self.workers], "ledger")
        self._ledger = self._ckpt_ledger.copy().merge(self._kept)

    def _revive(self, err: BaseException) -> bool:
        """After a failed call: if actors died, recreate them, rebuild the plane and roll
        every actor back to the last checkpoint (or to the start); True when the call
        may be retried."""
        if self.local or not self.workers:
            return False
        dead = self._dead()
        if not dead:
            return False
        if len(self.recoveries) >= self.cfg.runtime.max_recoveries:
            raise RuntimeError(f"actors {[stage_name(i) for i in dead]} died; already "
                               f"recovered {len(self.recoveries)} times "
                               f"(runtime.max_recoveries)") from err
        import ray

        t0 = time.perf_counter()
        self._outstanding = []
        lost = sorted(dead)
        for attempt in range(6):
            for i in dead:
                try:
                    ray.kill(self.workers[i])
                except Exception:  # noqa: BLE001
                    pass
                self.workers[i] = self._placer.spawn_one(StageWorker, i)
                self._owned.add(i)
            try:
                self._get([self.workers[i].setup.remote(self._specs[i]) for i in dead],
                          "recovery setup")
                break
            except RuntimeError:
                # a lost node: until Ray has marked it dead and moved its placement-group
                # bundles, a replacement may be placed there and die too -- try again
                if attempt == 5:
                    raise
                time.sleep(2 ** attempt)
                dead = self._dead()
                lost = sorted(set(lost) | set(dead))
        self._new_streams()
        self._mb.clear()
        self._ch_now = self.channels  # every actor's load or setup routes through them
        if self._ckpt is not None:
            self._get([w.load_checkpoint.remote(str(self._ckpt)) for w in self.workers],
                      "recovery")
            restored = self._ckpt_step
        else:  # no checkpoint yet: every actor back to its initial state
            alive = [i for i in range(self.num_stages) if i not in lost]
            self._get([self.workers[i].setup.remote(self._specs[i]) for i in alive],
                      "recovery setup")
            if self._pre_mirror:
                self._broadcast("mirror", n=self._pre_mirror)
            restored = 0
        self._open_plane()
        self.stage_info = self._get([w.info.remote() for w in self.workers], "info")
        if getattr(self, "_span_window", None):  # the timeline's steps, noted once each
            self.record_spans(*self._span_window)
        self._rewind_ledgers()
        # exactly once: retrain the steps since the checkpoint on the very batches, lr
        # and wd they had; every actor's weights, optimizer state and RNG streams are
        # the checkpoint's, so each step computes what it computed the first time (under
        # async too: the checkpoint drained the stream, and the replay refills it as the
        # run did after the checkpoint)
        replayed = 0
        with self._replay.replaying():
            for x, y, step, lr, wd, drained in self._replay.batches():
                self._train(x, y, step, lr, wd)
                if drained:  # as the run did after this step (async: an evaluation)
                    self._drain()
                replayed += 1
            if self._kept_from is not None:
                # a call that sets its traffic apart (`keeps_traffic`) is retried next:
                # its traffic starts after the replay's
                self._drain()
                self._kept_from = Ledger.merged([self._ledger, *self._actor_ledgers()])
        self.recoveries.append({
            "at_step": self._step, "dead": [stage_name(i) for i in lost],
            "restored_step": restored, "replayed_steps": replayed,
            "lost_steps": max(self._step - 1 - restored - replayed, 0),
            "checkpoint": str(self._ckpt) if self._ckpt else None,
            "error": f"{type(err).__name__}: {err}"[:300],
            "seconds": time.perf_counter() - t0})
        return True


class Replay:
    """The batches trained since the last checkpoint, with their step, lr and wd, so a
    recovery can retrain them.  Past `limit_bytes` it gives up (`batches()` is then
    empty and a recovery loses those steps, as its record says) rather than hold an
    unbounded share of the driver's memory; the next checkpoint starts it afresh."""

    def __init__(self, limit_bytes: int = 1 << 30):
        self.limit = limit_bytes
        self._replaying = False
        self.clear()

    def clear(self) -> None:
        self._items: list | None = []
        self._bytes = 0

    def remember(self, x, y, step: int, lr: float, wd: float) -> None:
        if self._items is None:
            return
        self._bytes += x.nbytes + y.nbytes
        if self._bytes > self.limit:
            self._items = None
            return
        self._items.append([x, y, step, lr, wd, False])

    def drained(self) -> None:
        """The stream was drained after the last batch remembered (not by a replay's own
        drains, which follow the batches they replay)."""
        if self._items and not self._replaying:
            self._items[-1][-1] = True

    @contextlib.contextmanager
    def replaying(self):
        was, self._replaying = self._replaying, True
        try:
            yield
        finally:
            self._replaying = was

    def batches(self) -> list:
        return list(self._items or [])


