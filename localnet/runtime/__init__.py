"""Distributed runtime: pipeline stages as Ray actors, exchanging typed messages.

  messages.py      typed, versioned wire messages (activation / error / target; control)
  ledger.py        messages and bytes per (edge, kind); weight transport (bp)
  schedule.py      gpipe / 1f1b / async as data over an actor graph; a dry-run
                   simulator (bubbles, deadlocks, staleness, cores)
  partition.py     runtime.partition -> a Placement (per_unit, per_layer, stages, groups)
  graph.py         Placement (the actor graph) and NodeStage (a Stage with several
                   inputs, a device, and weight stashing for async)
  cost.py          per-actor forward/backward/update cost, measured in-process
  plan.py          `localnet simulate`
  worker.py        StageWorker: one actor (a plain class; an actor once spawned)
  ray_executor.py  RayExecutor: InProcessExecutor's interface on Ray actors; checkpoints
                   per actor, recovery from a dead actor

Ray is imported only by ray_executor, and only when an executor is created.
"""

from .ledger import Ledger
from .messages import Control, Message, MessageError, validate
from .schedule import DeadlockError, gpipe, make_schedule, one_f_one_b, simulate

__all__ = ["Control", "DeadlockError", "Ledger", "Message", "MessageError", "gpipe",
           "make_schedule", "one_f_one_b", "simulate", "validate"]
