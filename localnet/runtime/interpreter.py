"""An actor's own interpreter: it runs its part of the schedule for a batch by itself.

The coordinator gives each actor one call per batch: its action list (`localnet/schedules`,
with each micro-batch's step, and each update's lr and wd), plus the inputs (first
actor) or the targets (last actor).  The actor then receives each activation and error
it needs from the data plane (`plane.py`), computes (`worker.py`: the same validated
messages, channels, ledger and audit), and sends what it produces straight to the
actors that need it.  No activation or error passes through the coordinator, and the
coordinator's CPU no longer grows with micro-batches or actors.

Actions, as the coordinator sends them (plain tuples, cheap to pickle):

    ("F", step, mb)          forward of a training micro-batch (the last actor also
                             computes the loss and e from the targets)
    ("B", step, mb)          backward: the errors from the actors above (summed), or
                             DFA's e from the last actor; sends one error per input
    ("S", step, lr, wd)      this actor's optimizer step
    ("I", step, mb)          forward only, for evaluation (the last actor: loss stats)

`interpret` is a generator: it yields what it must receive next -- (rank, kind, step,
micro-batch) -- and is sent back (header, payload).  On Ray the actor drives it with blocking receives
(`StageWorker.run`); in one process (`executor: local`) the coordinator drives every
actor's generator round-robin over in-process queues, so both run the same code.  Each
pair of actors carries one kind of message in one direction (activations up an edge,
errors down it, DFA's e from the last actor), in the order both lists agree on
(ascending micro-batches), so a plain FIFO per pair is enough.
"""

from __future__ import annotations

import time
from collections import Counter

from .messages import ACTIVATION, ERROR, MessageError


def interpret(w, actions, inputs: dict, targets: dict):
    """Run `actions` on worker `w`; returns the stats messages of the last actor."""
    stats = []
    win = getattr(w, "_span_window", None)  # the steps whose actions are noted (timeline)

    def note(op, step, mb, t0):
        """An action's span, from its messages in to its messages out."""
        if t0 is not None:
            w._spans.append([op, step, mb, t0, time.time()])

    for a in actions:
        op = a[0]
        t0 = time.time() if win and win[0] <= a[1] < win[1] and op != "I" else None
        if op == "S":
            w.step(a[2], a[3])
            note("STEP", a[1], -1, t0)
            continue
        step, mb = a[1], a[2]
        if op in ("F", "I"):
            wire = []
            for p in w.input_ranks:  # in input order; -1: the coordinator's batch
                wire += inputs[(step, mb)] if p < 0 else (yield p, ACTIVATION, step, mb)
            if w.is_last:
                wire += targets[(step, mb)]
            if op == "I":
                out = w.infer(*wire, at=(step, mb))
                if w.is_last:
                    stats.append(out)
                else:
                    _ship(w, w.receiver_ranks, out)
                continue
            t0 = None if t0 is None else time.time()  # the span starts once its inputs are in
            _, out = w._forward(wire, at=(step, mb))
            if not w.is_last:
                _ship_each(w, w.receiver_ranks, out)
            elif isinstance(out, bytes):
                stats.append(out)
            else:  # DFA: e for every other actor -- one message, or one per channel
                stats.append(out[0])
                _ship_each(w, [r for r in range(w.num_stages) if r != w.index], out[1:])
            note("F", step, mb, t0)
        elif op == "B":
            wire = []
            for c in _error_sources(w):
                wire += yield c, ERROR, step, mb
            t0 = None if t0 is None else time.time()
            errs = w._backward(step, mb, wire)
            if errs:
                for j, r in enumerate(w.producer_ranks[:len(errs) // 2]):
                    _ship(w, [r], errs[2 * j:2 * j + 2])
            note("B", step, mb, t0)
        else:
            raise ValueError(f"{w.name}: unknown action {a!r}")
    return stats


def _error_sources(w) -> list[int]:
    """Whom a backward receives its error(s) from, in order: DFA's e from the last actor,
    else every consumer (summed)."""
    if w.is_last:
        return []
    if w.broadcast_output_error:
        return [w.last_rank]
    return list(w.consumer_ranks)


def receives(w, actions) -> Counter:
    """How many messages `interpret(w, actions, ...)` will take from each actor: the
    plane posts a receive ahead only for one that will come in this call."""
    n: Counter = Counter()
    for a in actions:
        if a[0] in ("F", "I"):
            n.update(p for p in w.input_ranks if p >= 0)
        elif a[0] == "B":
            n.update(_error_sources(w))
    return n


def _ship_each(w, ranks, parts) -> None:
    """`parts`: one (header, payload) pair for every rank, or one pair for them all."""
    if len(parts) == 2:
        _ship(w, ranks, parts)
        return
    for j, r in enumerate(ranks):
        _ship(w, [r], parts[2 * j:2 * j + 2])


def _ship(w, ranks, pair) -> None:
    if w._fault_silent:  # test hook (inject_fault mode "silent"): this message never leaves
        w._fault_silent = False
        return
    raw, payload = pair
    for r in ranks:
        w.plane.send(r, raw, payload)


def drive(gen, plane):
    """Run an interpreter generator to its end with blocking receives from `plane`."""
    try:
        want = next(gen)
        while True:
            want = gen.send(_recv(plane, want))
    except StopIteration as stop:
        return stop.value


def _recv(plane, want):
    src, kind, step, mb = want
    try:
        return plane.recv(src)
    except MessageError as err:  # the plane knows the edge; the interpreter what it waited for
        if err.kind != "?":
            raise
        raise type(err)(err.reason, err.src, err.dst, kind, step, mb) from None


def drive_all(gens: list, ends: list) -> list:
    """Run every actor's generator in this process, round-robin: each goes on while
    what it waits for is queued.  A schedule the simulator accepted never gets stuck;
    if one does, the error names who waits for whom."""
    from ..schedules import DeadlockError

    outs: list = [None] * len(gens)
    want: dict[int, int] = {}

    def advance(s, value=None, first=False):
        try:
            want[s] = next(gens[s]) if first else gens[s].send(value)
        except StopIteration as stop:
            outs[s] = stop.value
            want.pop(s, None)

    try:
        for s in range(len(gens)):
            advance(s, first=True)
        while want:
            moved = False
            for s in sorted(want):
                while s in want and ends[s].ready(want[s][0]):
                    advance(s, _recv(ends[s], want[s]))
                    moved = True
            if not moved:
                raise DeadlockError([(s, f"receive {w[1]} {w[2]}:{w[3]}", [(w[0], "send")])
                                     for s, w in want.items()])
    finally:
        for g in gens:
            g.close()
    return outs
