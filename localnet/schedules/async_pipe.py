"""async: 1F1B with an update after every backward and no flush (PipeDream's
weight-stashing pipeline, Narayanan et al. 2019), streamed across batches."""

from pydantic import Field

from ..registry import NoOptions
from .base import STEP_MB, Action, B, F, PipelineSchedule, _graph, depths


class Async(PipelineSchedule):
    """Stage s warms up with d(s) forwards, then runs F(m+d) B(m) STEP(m): it updates as
    soon as micro-batch m's error is in, and its forward of m runs on weights that miss
    the updates of the d(s) micro-batches before it (`stream_staleness`).  The runtime
    streams one endless list per stage across batches (`stream`); a batch's own lists
    are that stream cut at the batch's end, so both come from one generator."""

    name = "async"
    streamed = True
    flush_with = "1f1b"

    class Options(NoOptions):
        # A coordinator that issues batch b+1 only once batch b's loss is back leaves the
        # first actor idle for a forward through the whole pipeline every batch.  Issued
        # ahead, b+1 waits in each actor's queue; every actor runs its own list in the
        # same order either way, so the maths is the same.  One is the training loop's
        # look-ahead (train.py), and enough to keep the first actor fed.
        ahead: int = Field(1, ge=0, le=1, description="batches the coordinator issues "
                           "before the loss of the one it returns is back: 1 keeps the "
                           "first actor busy across batches, 0 feeds one at a time "
                           "(the same maths)")

    def stages(self, S, M, graph):
        out = []
        for d in depths(graph):
            s = self.stream(d)
            out.append(s.take(M) + s.drain(M))
        return out

    def stream(self, d: int, start: int = 0) -> "AsyncStream":
        return AsyncStream(d, start)


def stream_staleness(graph: list[list[int]] | None, S: int) -> list[int]:
    """Per stage, the staleness of the async schedule streamed across batches (no
    flush): d(s), the edges on the longest path from the stage to the last one."""
    return depths(_graph(S, graph))


def take_lags(graph: list[list[int]] | None, S: int, s: int) -> dict[int, int]:
    """For stage s streaming async: the stages that may take a message from s more than
    one call (batch piece) after the call that sent it, each with that many calls, plus
    one.  Stage t runs B(g) right after F(g + d(t)), and each call's piece holds the
    forwards of that batch's micro-batches, so t takes micro-batch g's error in the
    piece of micro-batch g + d(t).  An error s sends for g (at its own B(g), or, from
    the last stage, with its loss) therefore waits up to d(t) - d(s) micro-batches, so
    at most that many calls (M = 1; fewer with more micro-batches per batch).  Along a
    chain d(t) - d(s) = 1; DFA's error goes from the last stage to every stage, the first
    of them d(0) micro-batches behind.  Forwards are taken within the call that sent
    them.  The sender must not wait for such a message sooner (`GlooPlane.settle`)."""
    d = stream_staleness(graph, S)
    return {t: 1 + d[t] - d[s] for t in range(S) if d[t] - d[s] > 1}


class AsyncStream:
    """One stage's endless async action list, from micro-batch `start` on:
    F(start) .. F(start+d-1), then F(g+d) B(g) STEP(g) for g = start, start+1, ...

    take(limit): the next actions up to (not including) the first F(g >= limit).
    take(limit, to_forward=True): only up to F(limit - 1), the batch's last forward: the
    stage's backwards and updates after it open its next piece.  The runtime cuts the
    last stage's stream so: the coordinator's step returns once that stage has the
    batch's loss, and the first stage's forward of the next batch (which waits for that
    return) runs while the last stage does the backward of this batch's last
    micro-batch.  Cut after the backward, every batch would add one forward of the first
    stage to the pipeline's period.  The order of actions, and so the maths, is the same.
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

    def take(self, limit: int, to_forward: bool = False) -> list[Action]:
        out = []
        while not (self._peek.op == "F" and self._peek.mb >= limit):
            if to_forward and out and out[-1].op == "F" and out[-1].mb == limit - 1:
                break
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
