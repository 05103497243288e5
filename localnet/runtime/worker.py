"""`StageWorker`: one actor of the runtime's graph, the unit of placement.

A plain class (no Ray in here): the executor makes it an actor at spawn time with
`ray.remote(num_cpus=..., num_gpus=...)(StageWorker)`, and tests can drive it directly.
It builds the whole model from the config (deterministic in the seed), keeps only its
part -- a group of units, or one node of the layer graph (`partition: per_layer`) -- and
wraps a `NodeStage` (stage.py: a `Stage` with several inputs) around it, so the
maths is the in-process engine's, line for line.

Everything it receives is a wire message (header bytes + ndarray) and is validated before
use: kind, edge, step, micro-batch, shape, dtype, finite values.  Everything it sends is
counted in its ledger.  The last actor also owns the loss: given the targets, its forward
computes loss and e = dL/dlogits (`engine.loss_and_error`).

Calls (what the coordinator invokes):
  run(actions, inputs, targets)   this actor's action list for a batch, interpreted by
                        the actor itself (interpreter.py): activations and errors come
                        from and go to the other actors over the data plane (plane.py);
                        returns the last actor's stats messages
  plane_host() / plane_open(addr, port, world, timeout_s)   join the data plane
  infer(*wire)          forward only -> (hdr, payload) | stats (run's "I" action)
  control(raw)          step / mirror / mode / reset commands
  save_checkpoint(dir) / load_checkpoint(dir)   this actor's own state, to/from its file

Failure.  A call that fails marks the worker failed (`_failed`) and sends an abort frame
to every other actor, so peers waiting on it stop at once; every later `run` fails with
the same error until `reset()`, so an update never applies half a batch.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..alloc import keep_freed_memory, release_free_memory
from ..engine import loss_and_error
from ..files import load_state, save_state
from ..layers import ErrorTap, restore_rules, set_rule
from ..rules import make_rule
from ..builders import as_config, build_rule_and_model, optim_config
from ..models import unit_shapes
from ..metrics import StageTimer
from ..channels.channel import DATA, WAIT, error_delays, make_channel
from ..channels.wire import EMPTY, LOST, WAITING, marker, pack, unpack
from ..stage import NodeStage
from .graph import Placement, actor_units, modules_for
from ..ledger import Ledger
from .messages import (ACTIVATION, BROADCAST, CHAIN, CONTROL, ERROR, OUTPUT, TARGET, Control,
                       Header, Message, MessageError, validate)

DRIVER = "driver"


def _cpu(obj):
    """A copy of a (nested) state with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _ray_node() -> str | None:
    """The Ray node this actor runs on (None outside a Ray worker)."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; nothing else needs to
    try:
        return ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None
    except Exception:  # noqa: BLE001
        return None


def stage_name(i: int) -> str:
    return f"stage{i}"


def worker_specs(cfg, placement: Placement, model, input_shape, num_classes: int,
                 **common) -> list[dict]:
    """One `StageWorker.setup` spec per actor of `placement`, from the whole `model` the
    coordinator built: each names the units that actor builds, and every unit's input
    shape, so no actor builds more than its own.  common: run, audit, threads, device,
    stash."""
    shapes = [list(x) for x in unit_shapes(model, input_shape)]
    return [{"config": as_config(cfg).model_dump(mode="json"), "index": i,
             "placement": placement.to_dict(), "input_shape": list(input_shape),
             "unit_shapes": shapes, "units": units, "num_classes": int(num_classes),
             **common} for i, units in enumerate(actor_units(placement, model))]


class StageWorker:
    def __init__(self, spec: dict | None = None, threads: int = 1, model=None):
        keep_freed_memory()  # an actor reallocates its activations every step (alloc.py)
        if threads:  # 0: leave the process's setting alone (in-process use)
            torch.set_num_threads(int(threads))
        self._ledger = Ledger()
        self._audit: list[dict] = []
        self._fault: dict | None = None
        self._fault_silent = False
        self._failed: BaseException | None = None  # see run()
        self.stage = None
        self.plane = None
        if spec is not None:
            self.setup(spec, model)

    # ------------------------------------------------------------------ construction
    def setup(self, spec: dict, model=None) -> dict:
        """(Re)build this worker for an actor of the graph.  spec: config (dict or Config),
        index, placement (Placement.to_dict()), input_shape, unit_shapes (each unit's input
        shape, then the output's), units (the ones this actor builds), num_classes, run,
        audit, threads, device, stash.
        model: a freshly built model to take the modules from (local mode builds one for
        every worker); default: build it here."""
        cfg = as_config(spec["config"])
        threads = spec.get("threads", cfg.runtime.threads)
        if threads:
            torch.set_num_threads(int(threads))
        self.index = int(spec["index"])
        pl = Placement.from_dict(spec["placement"])
        self.placement = pl
        self.num_stages = pl.num_actors
        self.name = stage_name(self.index)
        self.inputs = [DRIVER if p < 0 else stage_name(p) for p in pl.inputs[self.index]]
        self.consumers = [stage_name(c) for c, _ in pl.consumers[self.index]]
        self.receivers = list(dict.fromkeys(self.consumers))  # each consumer once
        self.last_name = stage_name(pl.sink)
        # the same, as ranks on the data plane (actor index; -1: the driver)
        self.input_ranks = list(pl.inputs[self.index])
        self.producer_ranks = [p for p in self.input_ranks if p >= 0]
        self.consumer_ranks = [c for c, _ in pl.consumers[self.index]]
        self.receiver_ranks = list(dict.fromkeys(self.consumer_ranks))
        self.last_rank = pl.sink
        self.is_last = self.index == pl.sink
        self.is_first = all(p == DRIVER for p in self.inputs)
        self.kind = pl.kind
        member = pl.members[self.index]
        self.units = tuple(member) if pl.kind == "units" else (member,)
        self.run_id = str(spec.get("run", ""))
        self.audit_enabled = bool(spec.get("audit", False))
        self.num_classes = int(spec["num_classes"])
        self.device = torch.device(spec.get("device") or "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{self.name}: runtime.num_gpus > 0 but this actor sees no GPU "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
        torch.manual_seed(cfg.seed)

        shapes = [tuple(s) for s in spec["unit_shapes"]]
        if model is None:  # only this actor's units: their weights are the whole model's
            rule, model = build_rule_and_model(cfg, spec["input_shape"], self.num_classes,
                                               units=spec["units"], unit_shapes=shapes)
        else:
            rule = make_rule(cfg.rule.name, **cfg.rule.options())
        if pl.kind == "units":
            a, b = member
            if not (0 <= a < b <= len(model.units)):
                raise ValueError(f"{self.name}: units [{a}, {b}) outside the model's "
                                 f"{len(model.units)}")
        mods, names, unit_ids, in_shapes, out_shape = modules_for(pl, self.index, model,
                                                                  shapes)
        self.in_shapes, self.out_shape = [tuple(s) for s in in_shapes], tuple(out_shape)
        self.in_shape = self.in_shapes[0]
        self.node_name = pl.names[self.index][0] if pl.kind == "layers" else None
        self.rule = rule
        self.unit_names = names
        self.unit_ids = unit_ids
        # stash the weights each forward used when its backward may come later: the
        # async schedule, and delayed error channels (localnet/channels)
        stash = bool(spec.get("stash", False)) or error_delays(cfg.channel)
        self.stage = NodeStage(mods, optim_config(cfg), names,
                               grad_inputs=[p != DRIVER for p in self.inputs],
                               device=self.device, stash=stash)
        self.stage.train(True)
        self._timer = StageTimer(self.stage)  # observability: see timings()
        self._setup_channels(cfg, pl, list(model.unit_names), not rule.sends_error)
        del model
        params = list(self.stage.module.parameters())
        self.dtype = params[0].dtype if params else torch.float32
        self._transport = self.stage.transported_bytes()
        # DFA: no error is sent down; e is broadcast and each stage's output tap discards
        # whatever gradient arrives from above -- check that it really does.
        self.broadcast_error = not rule.sends_error
        if self.broadcast_error and not self.is_last and not self._ends_with_tap():
            raise ValueError(f"{self.name}: rule {rule.name} needs every stage boundary right "
                             f"after an error tap; {names} ({self.node_name or 'units'}) "
                             f"does not end with one")
        self._probe = None
        self._inflight: dict[tuple, tuple[int, tuple]] = {}  # (step, mb) -> (batch, out shape)
        self._errors: dict[tuple, torch.Tensor] = {}         # last stage: (step, mb) -> e
        self._ledger.clear()
        self._audit.clear()
        self._fault = None
        self._fault_silent = False
        self._failed = None
        release_free_memory()  # the build's temporaries (and a replaced stage's memory)
        return self.info()

    # ------------------------------------------------------------------ channels
    def _setup_channels(self, cfg, pl: Placement, unit_names: list[str], dfa: bool) -> None:
        """Communication restrictions (localnet/channels), split at send / receive: this
        actor owns the sending half of its outgoing links (codec state, drops, bytes) and
        the receiving half of its incoming ones (decode, delay FIFO).  Edges and seeds are
        `InProcessExecutor`'s (`ChannelSet`), so both executors draw the same numbers."""
        self.ch = {}                 # "act_in" | "act_out" | "err_in" | "err_out" -> Channel
        self.ch_dfa: list = []       # last stage, DFA: one error link per other stage
        self._ch_on = self._ch_cfg = False
        self._bwd_since_step = 0
        self._order: deque = deque()  # stored forwards, oldest first (errors pair in order)
        if not cfg.channel.active() or self.num_stages == 1:
            return
        if pl.kind != "units" or not pl.is_chain:
            raise ValueError("channel: communication restrictions need a chain of unit "
                             "groups (runtime.partition: per_unit, {stages: N} or explicit "
                             "groups), not per_layer")
        m, i, n = pl.members, self.index, self.num_stages
        first = lambda j: unit_names[m[j][0]]  # noqa: E731
        last = lambda j: unit_names[m[j][1] - 1]  # noqa: E731
        mk = lambda kind, src, dst, b: make_channel(  # noqa: E731
            cfg.channel, kind, src, dst, boundary=b, seed=cfg.seed,
            slots_per_step=cfg.train.micro_batches)
        if i < n - 1:
            self.ch["act_out"] = mk("activation", last(i), first(i + 1), m[i][1])
            src = first(n - 1) if dfa else first(i + 1)
            self.ch["err_in"] = mk("error", src, last(i), m[i][1])
        if i > 0:
            self.ch["act_in"] = mk("activation", last(i - 1), first(i), m[i][0])
            if not dfa:
                self.ch["err_out"] = mk("error", first(i), last(i - 1), m[i][0])
        if dfa and i == n - 1:
            self.ch_dfa = [mk("error", first(i), last(j), m[j][1]) for j in range(n - 1)]
        self._ch_on = self._ch_cfg = True

    def set_channels(self, on: bool) -> None:
        """Route training messages through the channels (True, when configured) or not
        (measuring passes: BP-angle probes, forward_backward).  Forwards still waiting
        for delayed errors stay stored across the pause."""
        self._ch_on = bool(on) and self._ch_cfg

    def channel_stats(self) -> dict:
        """This actor's halves of its links: the sender's counts (messages, bytes, drops)
        and the receiver's (delivered, not yet arrived), by kind and edge."""
        out = {"send": [], "recv": []}
        senders = [c for k, c in self.ch.items() if k.endswith("_out")] + self.ch_dfa
        for c in senders:  # the sender's ledger holds what it put on the wire
            out["send"].append({"edge": c.edge, "kind": c.kind, **c.stats(0),
                                "ledger": c.ledger.to_dict()})
        for k, c in self.ch.items():
            if k.endswith("_in"):
                out["recv"].append({"edge": c.edge, "kind": c.kind, **c.stats(0)})
        return out

    def _send_coded(self, kind, x, ch, dst, step, mb, detail) -> Message:
        """Send x through channel ch (x None: an empty slot; WAIT: a waiting one).  The
        ledger counts the encoded bytes, a lost message's too (it was sent; the channel
        lost it)."""
        pbytes = 0
        if x is None:
            arr, meta = marker(ch.codec.name, EMPTY)
        elif isinstance(x, str):
            arr, meta = marker(ch.codec.name, WAITING)
        else:
            if self._aliases_state(x):
                raise RuntimeError(f"{self.name}: a {kind} message would carry a parameter")
            enc, lost = ch.encode(x)
            arr, meta = marker(ch.codec.name, LOST) if lost else pack(enc)
            pbytes = enc.nbytes - enc.scalar_bytes  # the scalars travel in the header
        msg = Message.make(kind, arr, src=self.name, dst=dst, step=step, mb=mb, run=self.run_id,
                           detail=detail, meta={"codec": meta})
        msg = self._maybe_fault(msg)
        self._ledger.record(self.name, dst, msg.header.kind, msg.header_bytes, pbytes)
        return msg

    def _receive_coded(self, ch, raw, payload, kind, shape, dtype, *, src, detail, step,
                       mb) -> tuple[str, Message | None]:
        """Receive through channel ch: the slot due now (after `delay`) -- (DATA, the
        message decoded and validated like any other), (LOST, None) when it was lost or
        sent empty, (WAIT, None) when nothing has arrived yet."""
        msg = self._open(raw, payload, kind, src)
        h = msg.header
        validate(msg, kind, None, None, detail=detail, dst=self.name, step=step, mb=mb,
                 finite=False)
        meta = h.meta.get("codec")
        if not isinstance(meta, dict) or meta.get("name") != ch.codec.name:
            raise h.error(f"expected a {ch.codec.name}-encoded message on this channel",
                          self.name)
        try:
            enc = unpack(msg.payload, meta)
        except ValueError as err:
            raise h.error(str(err), self.name) from None
        ch.arrive(enc)
        state, x = ch.receive_slot()
        if state != DATA:
            return state, None
        arr = x.detach().contiguous().numpy()
        dec = Header(kind=kind, src=h.src, dst=h.dst, step=h.step, mb=h.mb, dtype=arr.dtype.name,
                     shape=tuple(arr.shape), run=h.run, detail=h.detail)
        return DATA, validate(Message(dec, arr, raw), kind, shape, dtype, dst=self.name)

    def _ends_with_tap(self) -> bool:
        outs = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o))
                 for m in self.stage.module.modules() if isinstance(m, ErrorTap)]
        was = self.stage.module.training
        self.stage.module.eval()
        try:
            with torch.no_grad():
                y = self.stage.module(*[torch.zeros(2, *s, dtype=self.dtype, device=self.device)
                                        for s in self.in_shapes])
        finally:
            for hk in hooks:
                hk.remove()
            self.stage.module.train(was)
        return any(y is o for o in outs)

    def info(self) -> dict:
        return {"name": self.name, "index": self.index, "units": list(self.units),
                "unit_names": self.unit_names if self.kind == "units" else [self.node_name],
                "node": self.node_name, "inputs": self.inputs, "consumers": self.receivers,
                "in_shape": list(self.in_shape), "in_shapes": [list(s) for s in self.in_shapes],
                "out_shape": list(self.out_shape),
                "params": sum(p.numel() for p in self.stage.module.parameters()),
                "rule": self.rule.name, "broadcast_error": self.broadcast_error,
                "device": str(self.device), "stash": self.stage.stash,
                "pid": os.getpid(), "host": socket.gethostname(), "ray_node": _ray_node(),
                "threads": torch.get_num_threads(),
                # CPU this process has used so far: at setup, what starting an actor costs
                # (Ray's worker, `import torch`, building its units)
                "process_cpu_s": round(time.process_time(), 3)}

    def ping(self) -> str:
        return self.name

    # ------------------------------------------------------------------ wire helpers
    def _receive(self, raw, payload, kind, shape, dtype, *, src, detail=None, step=None,
                 mb=None) -> Message:
        msg = self._open(raw, payload, kind, src)
        if "codec" in msg.header.meta:
            raise msg.header.error("an encoded message where a plain one was expected "
                                   "(channels on one side only)", self.name)
        return validate(msg, kind, shape, dtype, detail=detail, dst=self.name, step=step, mb=mb)

    def _open(self, raw, payload, kind, src) -> Message:
        """Decode the header (naming the edge on failure), audit, check the sender."""
        try:
            msg = Message.from_wire(raw, payload)
        except MessageError as err:
            raise MessageError(err.reason, err.src if err.src != "?" else src, self.name,
                               err.kind if err.kind != "?" else kind, err.step, err.mb) from None
        if self.audit_enabled:
            self._audit.append({"src": msg.header.src, "dst": self.name, "kind": msg.header.kind,
                                "detail": msg.header.detail, "step": msg.header.step,
                                "mb": msg.header.mb, "header_bytes": len(raw),
                                # what arrived, on the wire or through shared memory
                                "payload_bytes": msg.payload_bytes,
                                "payload": np.array(msg.payload)})
        if msg.header.src != src:
            raise msg.header.error(f"expected a message from {src}", self.name)
        return msg

    def _aliases_state(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        m = self.stage.module
        return any(p.untyped_storage().data_ptr() == ptr
                   for p in itertools.chain(m.parameters(), m.buffers()))

    def _send(self, kind, tensor, dst, step, mb, detail, *, meta=None, receivers=None) -> Message:
        pbytes = tensor.numel() * tensor.element_size() if self._aliases_state(tensor) else 0
        msg = Message.make(kind, tensor, src=self.name, dst=dst, step=step, mb=mb, run=self.run_id,
                           detail=detail, meta=meta)
        msg = self._maybe_fault(msg)
        for r in receivers or [dst]:
            self._ledger.record(self.name, r, msg.header.kind, msg.header_bytes, msg.payload_bytes,
                                parameter_bytes=pbytes)
        return msg

    def _send_control(self, op, dst, step, args) -> bytes:
        raw = Control(op, src=self.name, dst=dst, step=step, run=self.run_id, args=args).encode()
        self._ledger.record(self.name, dst, CONTROL, len(raw), 0)
        return raw

    def _activations(self, wire, detail=None, at=None) -> list[Message]:
        """The input activations, validated; `at` (step, mb): the micro-batch the
        schedule says comes next, which every one of them must be."""
        step, mb = at if at is not None else (None, None)
        k = len(self.inputs)
        if len(wire) < 2 * k:
            raise MessageError(f"{self.name} expects {k} activation(s), got {len(wire) // 2}",
                               "?", self.name, ACTIVATION)
        ch = self.ch.get("act_in") if self._ch_on and detail is None else None
        if ch is not None:  # a chain: one input, from the stage below (never lost)
            state, msg = self._receive_coded(ch, wire[0], wire[1], ACTIVATION,
                                             (None, *self.in_shapes[0]), self.dtype,
                                             src=self.inputs[0], detail="train", step=step,
                                             mb=mb)
            if state != DATA:
                raise MessageError("an activation went missing (activations have no delay "
                                   "or drop)", self.inputs[0], self.name, ACTIVATION)
            msgs = [msg]
        else:
            msgs = [self._receive(wire[2 * i], wire[2 * i + 1], ACTIVATION,
                                  (None, *self.in_shapes[i]), self.dtype, src=self.inputs[i],
                                  detail=detail, step=step, mb=mb) for i in range(k)]
        h0 = msgs[0].header
        for m in msgs[1:]:
            if (m.header.step, m.header.mb) != (h0.step, h0.mb):
                raise m.header.error(f"step {m.header.step} micro-batch {m.header.mb} merged "
                                     f"with step {h0.step} micro-batch {h0.mb}", self.name)
            if m.payload.shape[0] != msgs[0].payload.shape[0]:
                raise m.header.error("batch size differs between the merged inputs", self.name)
        return msgs

    def _send_up(self, y, step, mb, detail):
        ch = self.ch.get("act_out") if self._ch_on and detail == "train" else None
        if ch is not None:
            return self._send_coded(ACTIVATION, y, ch, self.receivers[0], step, mb, detail).wire()
        return self._send(ACTIVATION, y, ",".join(self.receivers), step, mb, detail,
                          receivers=self.receivers).wire()

    # ------------------------------------------------------------------ data path
    # ------------------------------------------------------------------ data plane
    def plane_host(self) -> tuple[str, int]:
        """Address and free port for the data plane's store (asked of actor 0)."""
        from .plane import GlooPlane
        return GlooPlane.host()

    def plane_open(self, addr: str, port: int, world: int, timeout_s: float) -> bool:
        """Join a new data plane (every actor at once); the old one is dropped."""
        from .plane import GlooPlane
        self.plane_close()
        self.plane = GlooPlane(addr, port, self.index, world, timeout_s,
                               [stage_name(i) for i in range(world)])
        return True

    def plane_close(self) -> None:
        if self.plane is not None:
            self.plane.close()
            self.plane = None

    def run(self, actions, inputs=None, targets=None):
        """One batch of this actor's schedule (interpreter.py); every message it needs
        comes over the data plane, every one it makes goes straight to its reader."""
        from .interpreter import drive, interpret, receives
        try:
            if self._failed is not None:
                raise self._failed
            # Free what this actor sent in earlier calls, before this one allocates: a
            # flushing batch's messages were all taken within it (had it failed, the
            # coordinator rebuilt the plane, which drops them); async ones may be taken
            # in the receiver's next call.  Not at the end of this call: a peer that
            # failed mid-batch never takes them, and the wait would last the timeout.
            self.plane.settle(calls_back=2 if self.stage.stash else 0)
            self.plane.next_call()
            self.plane.expect(receives(self, actions))
            return drive(interpret(self, actions, inputs or {}, targets or {}), self.plane)
        except BaseException as err:
            self._failed = err
            if self.plane is not None:
                self.plane.abort(f"{type(err).__name__}: {err}")
            raise

    def _forward(self, wire, at=None):
        msgs = self._activations(wire, at=at)
        step, mb = msgs[0].header.step, msgs[0].header.mb
        key = (step, mb)
        if key in self._inflight:
            raise msgs[0].header.error(f"micro-batch {mb} is already in flight on {self.name}",
                                       self.name)
        xs = [m.tensor() for m in msgs]
        n = xs[0].shape[0]
        tmsg = None
        if self.is_last:  # check the targets before touching any state
            k = 2 * len(self.inputs)
            if len(wire) < k + 2:
                raise MessageError("the last stage's forward needs the targets", DRIVER,
                                   self.name, TARGET, step, mb)
            tmsg = self._receive(wire[k], wire[k + 1], TARGET, (n,), torch.int64,
                                 src=DRIVER, step=step, mb=mb)
        y = self.stage.forward(xs[0], key, xs[1:])
        self._inflight[key] = (n, tuple(y.shape))
        if self._ch_on and not self.is_last:
            self._order.append(key)
        if not self.is_last:
            return key, self._send_up(y, step, mb, "train")
        total = int(tmsg.header.meta.get("batch", n))
        loss_sum, correct, e = loss_and_error(y, tmsg.tensor().to(y.device), total)
        self._errors[key] = e
        stats = self._send_control("stats", DRIVER, step, {
            "mb": mb, "loss_sum": float(loss_sum), "correct": int(correct), "samples": int(n)})
        if self.broadcast_error and self.num_stages > 1 and self._ch_on:
            # one channel per receiving stage (its own codec state and drops)
            out = [stats]
            for j, ch in enumerate(self.ch_dfa):
                out.extend(self._send_coded(ERROR, e, ch, stage_name(j), step, mb,
                                            OUTPUT).wire())
            return key, tuple(out)
        if self.broadcast_error and self.num_stages > 1:
            others = [stage_name(i) for i in range(self.num_stages) if i != self.index]
            emsg = self._send(ERROR, e, BROADCAST, step, mb, OUTPUT, receivers=others)
            return key, (stats, *emsg.wire())
        return key, stats

    def _backward(self, step: int, mb: int, wire):
        key = (step, mb)
        if key not in self._inflight:
            raise RuntimeError(f"{self.name}: backward of step {step} micro-batch {mb} "
                               f"without its forward")
        batch, out_shape = self._inflight[key]
        if self.is_last:
            grad = e = self._errors.pop(key)
        elif self._ch_on:
            if len(wire) != 2:
                raise MessageError(f"{self.name} expects one error message, got "
                                   f"{len(wire) // 2}", "?", self.name, ERROR, step, mb)
            # the slot belongs to the oldest stored forward (the same micro-batch, the
            # channel's delay later): DATA runs its backward, LOST discards it, WAIT
            # keeps it (and every later one) until its error arrives
            old_batch, old_shape = self._inflight[self._order[0]]
            if self.broadcast_error:
                src, detail, shape = self.last_name, OUTPUT, (old_batch, self.num_classes)
            else:
                src, detail, shape = self.consumers[0], CHAIN, old_shape
            state, got = self._receive_coded(self.ch["err_in"], wire[0], wire[1], ERROR, shape,
                                             self.dtype, src=src, detail=detail, step=step,
                                             mb=mb)
            if state == WAIT:
                return self._send_errors_down(WAIT, batch, step, mb)
            key = self._order.popleft()
            batch, out_shape = self._inflight[key]
            if state != DATA:  # lost, or nothing reached the stage above: no update
                del self._inflight[key]
                self.stage._pending.pop(key, None)
                return self._send_errors_down(None, batch, step, mb)
            if self.broadcast_error:
                e, grad = got.tensor(), torch.zeros((), dtype=self.dtype).expand(out_shape)
            else:
                grad, e = got.tensor(), None
        elif self.broadcast_error:
            if len(wire) < 2:
                raise MessageError("DFA backward without the output error", self.last_name,
                                   self.name, ERROR, step, mb)
            emsg = self._receive(wire[0], wire[1], ERROR, (batch, self.num_classes), self.dtype,
                                 src=self.last_name, detail=OUTPUT, step=step, mb=mb)
            e = emsg.tensor()
            # the stage ends at an error tap, which discards the gradient from above
            grad = torch.zeros((), dtype=self.dtype).expand(out_shape)
        else:
            if len(wire) != 2 * len(self.consumers):
                raise MessageError(f"{self.name} expects {len(self.consumers)} chain error(s), "
                                   f"got {len(wire) // 2}", "?", self.name, ERROR, step, mb)
            grad, e = None, None
            for i, src in enumerate(self.consumers):
                g = self._receive(wire[2 * i], wire[2 * i + 1], ERROR, out_shape, self.dtype,
                                  src=src, detail=CHAIN, step=step, mb=mb).tensor()
                grad = g if grad is None else grad + g  # what autograd sums over the uses
        del self._inflight[key]
        dxs = self.stage.backward(grad, key, e)
        self._bwd_since_step += 1
        return self._send_errors_down(dxs, batch, step, mb)

    def _send_errors_down(self, dxs, batch, step, mb):
        """One error per input fed by another actor (dxs None: this micro-batch had no
        error, so an empty slot goes down the channel; WAIT: a waiting slot)."""
        if self.is_first or self.broadcast_error:
            return None
        if self._ch_on:
            dx = dxs if dxs is None or isinstance(dxs, str) else dxs[0]
            return self._send_coded(ERROR, dx, self.ch["err_out"], self.inputs[0], step, mb,
                                    CHAIN).wire()
        out = []
        for i, src in enumerate(self.inputs):
            if src == DRIVER:
                continue
            dx = dxs[i]
            if dx is None:  # no path from this input to the output: the error is zero
                dx = torch.zeros(batch, *self.in_shapes[i], dtype=self.dtype)
            out.extend(self._send(ERROR, dx, src, step, mb, CHAIN).wire())
        return tuple(out)

    @torch.no_grad()
    def infer(self, *wire, at=None):
        msgs = self._activations(wire, detail="eval", at=at)
        step, mb = msgs[0].header.step, msgs[0].header.mb
        xs = [m.tensor() for m in msgs]
        y = self.stage.infer(xs[0], xs[1:])
        if not self.is_last:
            return self._send_up(y, step, mb, "eval")
        k = 2 * len(self.inputs)
        t = self._receive(wire[k], wire[k + 1], TARGET, (xs[0].shape[0],), torch.int64,
                          src=DRIVER, step=step, mb=mb).tensor().to(y.device)
        return self._send_control("stats", DRIVER, step, {
            "mb": mb, "loss_sum": F.cross_entropy(y, t, reduction="sum").item(),
            "correct": int((y.argmax(1) == t).sum().item()), "samples": int(xs[0].shape[0])})

    # ------------------------------------------------------------------ control path
    def control(self, raw: bytes):
        """Run a driver command (step / mirror / mode / reset)."""
        c = Control.decode(raw)
        if self.audit_enabled:
            self._audit.append({"src": c.src, "dst": self.name, "kind": CONTROL, "detail": c.op,
                                "step": c.step, "mb": -1, "header_bytes": len(raw),
                                "payload_bytes": 0, "payload": None})
        if c.dst != self.name or c.src != DRIVER:
            raise MessageError(f"control {c.op} from {c.src} addressed to {c.dst}",
                               c.src, self.name, CONTROL, c.step)
        if c.op == "step":
            if self._failed is not None:  # a forward / backward of this batch failed
                raise self._failed
            self.step(c.args["lr"], c.args["wd"])
        elif c.op == "mirror":
            self.mirror_steps(int(c.args["n"]))
        elif c.op == "mode":
            self.train(bool(c.args["train"]))
        elif c.op == "reset":
            self.reset()
        else:
            raise MessageError(f"{c.op} is not a command", c.src, self.name, CONTROL, c.step)
        return None

    def step(self, lr: float, wd: float) -> None:
        if self._inflight and not self.stage.stash:
            raise RuntimeError(f"{self.name}: STEP with micro-batches {sorted(self._inflight)} "
                               f"still in flight (a schedule bug)")
        if self._ch_on and self._bwd_since_step == 0:
            return  # no error reached this stage since its last update: nothing to apply
        self._bwd_since_step = 0
        self.stage.step(lr, wd)
        if self._transport:
            self._ledger.record_transport(self._transport)

    def mirror_steps(self, n: int) -> None:
        self.stage.mirror_steps(n)

    def train(self, mode: bool = True) -> None:
        self.stage.train(mode)

    def reset(self) -> None:
        """Drop every in-flight micro-batch and gradient (after a failed step)."""
        self._failed = None
        self._inflight.clear()
        self._order.clear()
        self._errors.clear()
        self.stage._pending.clear()
        self.stage.zero_grad()
        self.stage.drop_snapshot()

    # ------------------------------------------------------------------ BP-angle probe
    def probe_begin(self) -> None:
        """Save BatchNorm statistics and zero gradients before extra measuring passes."""
        self._probe = {"bn": {k: v.clone() for k, v in self.stage.module.state_dict().items()
                              if "running" in k or "num_batches" in k},
                       "broadcast": self.broadcast_error, "rules": None}
        self.stage.zero_grad()

    def probe_rule(self, name: str | None) -> None:
        """Switch every layer to rule `name` (None: back to the configured rule)."""
        if self._probe["rules"] is not None:
            restore_rules(self.stage.module, self._probe["rules"])
            self._probe["rules"] = None
        if name is not None:
            rule = make_rule(name)
            self._probe["rules"] = set_rule(self.stage.module, rule)
            self.broadcast_error = not rule.sends_error
        else:
            self.broadcast_error = self._probe["broadcast"]

    def weight_grads(self, zero: bool = True) -> dict:
        g = {k: v.cpu() for k, v in self.stage.weight_grads().items()}
        if zero:
            self.stage.zero_grad()
        return g

    def probe_end(self) -> None:
        if self._probe is None:
            return
        self.probe_rule(None)
        self.stage.zero_grad()
        self.stage.module.load_state_dict(self._probe["bn"], strict=False)
        self.stage.drop_snapshot()
        self._probe = None

    # ------------------------------------------------------------------ metrics and state
    def alignment(self) -> dict:
        return self.stage.alignment()

    def _member(self) -> dict:
        if self.kind == "units":
            return {"units": list(self.units)}
        return {"node": self.node_name}

    def state_dict(self) -> dict:
        """This stage's own state: weights, feedback weights (layer buffers/parameters,
        with each layer's RNG), optimizer state, step count and the actor's torch RNG --
        on the CPU, whatever device the stage computes on."""
        st = {**self.stage.state_dict(), "rng": torch.get_rng_state(), **self._member()}
        if self.ch or self.ch_dfa:  # communication restrictions: each link's state
            st["channels"] = {"links": {k: c.state_dict() for k, c in self.ch.items()},
                              "dfa": [c.state_dict() for c in self.ch_dfa]}
        if self.device.type == "cuda":
            st["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return _cpu(st)

    def load_state_dict(self, state: dict) -> None:
        if "units" in state and (self.kind != "units" or tuple(state["units"]) != self.units):
            raise ValueError(f"{self.name}: checkpoint holds units {state['units']}, this "
                             f"stage runs {self._member()} (different runtime.partition?)")
        if "node" in state and state["node"] != self.node_name:
            raise ValueError(f"{self.name}: checkpoint holds layer {state['node']!r}, this "
                             f"stage runs {self._member()} (different runtime.partition?)")
        self.stage.load_state_dict(state)
        if "channels" in state:
            for k, c in self.ch.items():
                c.load_state_dict(state["channels"]["links"][k])
            for c, s in zip(self.ch_dfa, state["channels"]["dfa"]):
                c.load_state_dict(s)
        if "rng" in state:
            torch.set_rng_state(state["rng"].cpu() if hasattr(state["rng"], "cpu") else state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)

    def save_checkpoint(self, directory: str) -> dict:
        """Write this actor's state to <directory>/<name>.pt itself (atomically); nothing
        but this small receipt goes back to the driver."""
        if self._inflight and not (self._ch_on and self._order):
            raise RuntimeError(f"{self.name}: checkpoint with micro-batches "
                               f"{sorted(self._inflight)} in flight")
        # (forwards still waiting for a delayed error are not checkpointed: like the
        # channels' queues, a resumed run starts without them)
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{self.name}.pt"
        save_state(self.state_dict(), path)
        return {"actor": self.name, "file": path.name, "bytes": path.stat().st_size,
                "steps": self.stage.steps, **self._member(), "host": socket.gethostname(),
                "pid": os.getpid()}

    def load_checkpoint(self, directory: str) -> int:
        """Drop in-flight work and load <directory>/<name>.pt; returns the stage's steps."""
        path = Path(directory) / f"{self.name}.pt"
        if not path.exists():
            raise FileNotFoundError(f"{self.name}: no checkpoint file {path} (is the run "
                                    f"directory on a filesystem every node shares?)")
        # on the CPU: layer RNG states must stay CPU tensors; load_state_dict copies the
        # weights (and the optimizer its state) onto this actor's device
        state = load_state(path, f"{self.name}'s checkpoint")
        self.reset()
        self.load_state_dict(state)
        return self.stage.steps

    def unit_state(self) -> dict:
        """This stage's slice of the model state dict, keyed as in the full model
        ("units.<i>.<...>"), on the CPU."""
        out = {}
        for k, v in self.stage.module.state_dict().items():
            i, _, rest = k.partition(".")
            out[f"units.{self.unit_ids[int(i)]}.{rest}"] = v.cpu() if hasattr(v, "cpu") else v
        return out

    # -- observability (localnet/metrics.py) --
    def timings(self, clear: bool = True) -> dict:
        """Seconds per forward / backward / update call since the last call, training
        samples forwarded, and torch's GPU memory in use (None without CUDA)."""
        return self._timer.take(clear)

    def ledger(self, clear: bool = False) -> dict:
        d = self._ledger.to_dict()
        if clear:
            self._ledger.clear()
        return d

    def audit_log(self, clear: bool = True) -> list[dict]:
        out = list(self._audit)
        if clear:
            self._audit.clear()
        return out

    # ------------------------------------------------------------------ fault injection
    def inject_fault(self, kind: str, mode: str, step: int | None = None,
                     mb: int | None = None) -> None:
        """Test hook: corrupt this worker's next outgoing `kind` message (at `step`/`mb`
        when given).  mode: nan | inf | shape | dtype | kind | silent (never sent)."""
        if mode not in ("nan", "inf", "shape", "dtype", "kind", "silent"):
            raise ValueError(f"unknown fault mode {mode!r}")
        self._fault = {"kind": kind, "mode": mode, "step": step, "mb": mb}

    def _maybe_fault(self, msg: Message) -> Message:
        f, h = self._fault, msg.header
        if (f is None or f["kind"] != h.kind or f["step"] not in (None, h.step)
                or f["mb"] not in (None, h.mb)):
            return msg
        self._fault = None
        if f["mode"] == "silent":
            self._fault_silent = True  # the interpreter drops it (interpreter._ship)
            return msg
        arr, kind = msg.payload, h.kind
        if f["mode"] in ("nan", "inf"):
            arr = arr.copy()
            arr.flat[0] = np.nan if f["mode"] == "nan" else np.inf
        elif f["mode"] == "shape":
            arr = np.ascontiguousarray(arr[..., :-1]) if arr.shape[-1] > 1 else arr[..., None]
        elif f["mode"] == "dtype":
            arr = arr.astype(np.float64)
        else:
            kind = ERROR if kind == ACTIVATION else ACTIVATION
        bad = Header(kind=kind, src=h.src, dst=h.dst, step=h.step, mb=h.mb, dtype=arr.dtype.name,
                     shape=tuple(arr.shape), run=h.run, detail=h.detail, meta=h.meta)
        return Message(bad, arr, bad.encode())
