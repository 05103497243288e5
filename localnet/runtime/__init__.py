"""Distributed runtime: pipeline stages as Ray actors, exchanging typed messages.

  messages.py      typed, versioned wire messages (activation / error / target; control)
  partition.py     runtime.partition -> a Placement (per_unit, per_layer, stages, groups)
  graph.py         Placement (the actor graph); an actor's modules and shapes
  cost.py          per-actor forward/backward/update cost, measured in-process
  plan.py          `localnet simulate`
  worker.py        StageWorker: one actor (a plain class; an actor once spawned)
  endpoint.py      its end of the wire: messages made, validated, counted; channels
  stage_state.py   its state, checkpoint file, BP-angle probes, timings, and the
                   coordinator's commands (step, mirror, mode, reset)
  interpreter.py   the actor's own loop: its action list for a batch, messages in and out
  frames.py        the frame every message starts with (lengths, header, payload)
  plane.py         the data plane: actor to actor over torch.distributed (gloo; NCCL
                   between GPUs)
  local_plane.py   in-process queues and actor stand-ins for `executor: local`
  ray_executor.py  RayExecutor, the coordinator: placement, one call per actor per batch
  stream.py        the async schedule's stream across batches (no flush)
  recovery.py      a dead actor recreated, every actor back at the checkpoint, the lost
                   steps retrained
  executor_state.py the coordinator's whole-model operations (state, probes, reports)
  polls.py         what it reads off the actors for metrics and reports (timings,
                   CPU account, ledgers), between steps without waiting for them
  checkpoint.py    per-actor checkpoints and their manifests
  session.py       the Ray session, replies and their errors
  placement.py     the actors' placement group, refused when it can never fit, and
                   the actors started a few at a time into it

Ray is imported only in this package (session, placement, ray_executor, stream,
recovery, memory and plane), and only when an executor is created.  The pieces both executors share live
outside this package and import nothing from it: the stages (`localnet/stage.py`), the traffic ledger
(`localnet/ledger.py`), the channels (`localnet/channels`) and the schedules, which the
actors interpret and the simulator dry-runs (`localnet/schedules`).
"""

from ..ledger import Ledger
from .messages import Control, Message, MessageError, validate

__all__ = ["Control", "Ledger", "Message", "MessageError", "validate"]
