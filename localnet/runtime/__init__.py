"""Distributed runtime: pipeline stages as Ray actors, exchanging typed messages.

  messages.py      typed, versioned wire messages (activation / error / target; control)
  ledger.py        messages and bytes per (edge, kind)
  schedule.py      gpipe / 1f1b as data; a dry-run simulator (bubbles, deadlocks)
  partition.py     runtime.partition -> unit boundaries
  cost.py          per-unit forward/backward cost, measured in-process
  worker.py        StageWorker: one stage (a plain class; an actor once spawned)
  ray_executor.py  RayExecutor: InProcessExecutor's interface on Ray actors

Ray is imported only by ray_executor, and only when an executor is created.
"""

from .ledger import Ledger
from .messages import Control, Message, MessageError, validate
from .schedule import DeadlockError, gpipe, make_schedule, one_f_one_b, simulate

__all__ = ["Control", "DeadlockError", "Ledger", "Message", "MessageError", "gpipe",
           "make_schedule", "one_f_one_b", "simulate", "validate"]
