"""Pipeline schedules as data, and a dry-run simulator (`simulator.py`).

One file per schedule -- gpipe.py, one_f_one_b.py ("1f1b"), async_pipe.py ("async") -- each
a `PipelineSchedule` subclass that registers itself by its `name`; this package imports
every module in it, so a new schedule is one new file.  `make_schedule(name, S, M,
graph)` builds the per-stage action lists; the runtime's actors interpret the same lists
(`localnet/runtime/interpreter.py`).

gpipe and 1f1b process micro-batches in ascending order on every stage and step once per
batch, so gradients add up in the same order as in the in-process executor.  async
steps per micro-batch, and the runtime streams it across batches (`streamed`).
"""

from ..registry import discover
from .base import (SCHEDULES, STEP, STEP_MB, Action, B, F, PipelineSchedule, Schedule,
                   chain, check_schedule, consumers, depths, make_schedule, staleness)

discover(__name__, __path__)

from .async_pipe import AsyncStream, stream_staleness, take_lags  # noqa: E402 - registered above
from .simulator import DeadlockError, SimResult, simulate  # noqa: E402

__all__ = ["SCHEDULES", "STEP", "STEP_MB", "Action", "AsyncStream", "B", "DeadlockError",
           "F", "PipelineSchedule", "Schedule", "SimResult", "chain", "check_schedule",
           "consumers", "depths", "make_schedule", "simulate", "staleness",
           "stream_staleness", "take_lags"]
