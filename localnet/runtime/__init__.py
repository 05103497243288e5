"""Distributed runtime: pipeline stages as Ray actors, exchanging typed messages.

  messages.py      typed, versioned wire messages (activation / error / target; control)
  schedule.py      gpipe / 1f1b / async as data over an actor graph; a dry-run
                   simulator (bubbles, deadlocks, staleness, cores)
  partition.py     runtime.partition -> a Placement (per_unit, per_layer, stages, groups)
  graph.py         Placement (the actor graph); an actor's modules and shapes
  cost.py          per-actor forward/backward/update cost, measured in-process
  plan.py          `localnet simulate`
  worker.py        StageWorker: one actor (a plain class; an actor once spawned)
  interpreter.py   the actor's own loop: its action list for a batch, messages in and out
  plane.py         the data plane: actor to actor over torch.distributed (gloo)
  ray_executor.py  RayExecutor, the coordinator: placement, one call per actor per batch,
                   recovery from a dead actor
  executor_state.py the coordinator's whole-model operations (state, probes, reports)
  checkpoint.py    per-actor checkpoints and their manifests
  session.py       the Ray session, placement groups, replies and their errors

Ray is imported only by session, ray_executor and plane (the node's address), and only
when an executor is created.  The pieces both executors share live outside this package
and import nothing from it: the stages (`localnet/stage.py`), the traffic ledger
(`localnet/ledger.py`) and the channels (`localnet/channels`).
"""

from ..ledger import Ledger
from .messages import Control, Message, MessageError, validate
from .schedule import DeadlockError, gpipe, make_schedule, one_f_one_b, simulate

__all__ = ["Control", "DeadlockError", "Ledger", "Message", "MessageError", "gpipe",
           "make_schedule", "one_f_one_b", "simulate", "validate"]
