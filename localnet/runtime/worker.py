"""`StageWorker`: one actor of the runtime's graph, the unit of placement.

A plain class (no Ray in here): the executor makes it an actor at spawn time with
`ray.remote(num_cpus=..., num_gpus=...)(StageWorker)`, and tests can drive it directly.
It builds only its own part of the model -- a group of units, or one node of the layer
graph (`partition: per_layer`) -- with the weights the whole model would have, and
wraps a `NodeStage` (stage.py: a `Stage` with several inputs) around it, so the
maths is the in-process engine's, line for line.

Everything it receives is a wire message (header bytes + ndarray) and is validated before
use; everything it sends is counted in its ledger (`WireEnd`, endpoint.py).  What it keeps
beyond a batch -- state, checkpoint file, probes, timings -- is `StageState`
(stage_state.py).  The last actor also owns the loss: given the targets, its forward
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

import os
import socket
import sys
import time

import torch
import torch.nn.functional as F

from .. import LOADED_AT
from ..alloc import allocator, keep_freed_memory, release_free_memory
from ..builders import as_config, build_rule_and_model, optim_config
from ..channels.channel import DATA, WAIT, error_delays
from ..engine import loss_and_error
from ..layers import ErrorTap
from ..ledger import Ledger
from ..timing import StageTimer
from ..models import unit_shapes
from ..rules import make_rule
from ..schedules import take_lags
from ..stage import NodeStage
from .cpu_policy import (apply as cpu_policy_apply, current as cpu_policy_current,
                         for_actor as cpu_policy_for_actor)
from .endpoint import WireEnd
from .graph import Placement, actor_units, modules_for
from .plane import device_key
from .messages import (BROADCAST, CHAIN, DRIVER, ERROR, OUTPUT, TARGET, MessageError,
                       stage_name)
from .stage_state import StageState

def _ray_node() -> str | None:
    """The Ray node this actor runs on (None outside a Ray worker)."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; nothing else needs to
    try:
        return ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None
    except Exception:  # noqa: BLE001
        return None


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


class StageWorker(WireEnd, StageState):
    def __init__(self, spec: dict | None = None, threads: int = 1, model=None,
                 cpu_policy: str | None = None):
        keep_freed_memory()  # an actor reallocates its activations every step (alloc.py)
        if threads:  # 0: leave the process's setting alone (in-process use)
            torch.set_num_threads(int(threads))
        # an actor process's own policy (None in-process: the driver's threads stay as
        # they are)
        self._own_policy = bool(cpu_policy)
        if cpu_policy:
            cpu_policy_apply(cpu_policy, torch.get_num_threads())
        self._ledger = Ledger()
        self._audit: list[dict] = []
        self._fault: dict | None = None
        self._fault_silent = False
        self._failed: BaseException | None = None  # see run()
        # the main thread's CPU inside run() and between runs (Ray's task machinery and
        # the coordinator's other calls): StageState.timings splits it up
        self._cpu = {"run": 0.0, "calls": 0.0}
        self._run_ended: float | None = None
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
        if self._own_policy:  # rr is for single-threaded CPU actors (cpu_policy.py)
            cpu_policy_for_actor(self.device.type, torch.get_num_threads())
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
        # async: whom this actor's sends may reach several calls later (DFA's error)
        self._take_lags = take_lags([list(i) for i in pl.inputs], pl.num_actors,
                                    self.index) if stash else {}
        self._timer = StageTimer(self.stage)  # observability: see timings()
        self._setup_channels(cfg, pl, list(model.unit_names), rule.broadcast_output_error)
        del model
        params = list(self.stage.module.parameters())
        self.dtype = params[0].dtype if params else torch.float32
        self._transport = self.stage.transported_bytes()
        # DFA: no error is sent down; e is broadcast and each stage's output tap discards
        # whatever gradient arrives from above -- check that it really does.
        self.broadcast_output_error = rule.broadcast_output_error
        if self.broadcast_output_error and not self.is_last and not self._ends_with_tap():
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
        self._ready_at = time.time()  # info() is asked again after a recovery
        return self.info()

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
                "rule": self.rule.name, "broadcast_output_error": self.broadcast_output_error,
                "device": str(self.device), "stash": self.stage.stash,
                # which GPU (its UUID, the same in every process): actors sharing one
                "gpu": device_key(self.device),
                "pid": os.getpid(), "host": socket.gethostname(), "ray_node": _ray_node(),
                "host_cores": len(os.sched_getaffinity(0)),
                "threads": torch.get_num_threads(), "cpu_policy": cpu_policy_current(),
                "allocator": allocator(),
                # CPU this process has used so far: at setup, what starting an actor costs
                # (Ray's worker, `import torch`, building its units)
                "process_cpu_s": round(time.process_time(), 3),
                # wall clock: when the process began loading localnet, and when this
                # setup ended (how many actors were starting at once: Placer.start)
                "loaded_at": LOADED_AT, "ready_at": self._ready_at}

    def ping(self) -> str:
        return self.name

    # ------------------------------------------------------------------ data plane
    def plane_host(self) -> tuple[str, int]:
        """Address and free port for the data plane's store (asked of actor 0)."""
        from .plane import GlooPlane
        return GlooPlane.host()

    def plane_open(self, addr: str, port: int, world: int, timeout_s: float) -> list[int]:
        """Join a new data plane (every actor at once); the old one is dropped.  Returns
        the actors this one reaches on the device (plane.py: NCCL between GPUs)."""
        from .plane import GlooPlane
        self.plane_close()
        self.plane = GlooPlane(addr, port, self.index, world, timeout_s,
                               [stage_name(i) for i in range(world)], self.device)
        return sorted(self.plane.device_peers)

    def plane_close(self) -> None:
        if self.plane is not None:
            self.plane.close()
            self.plane = None

    def run(self, actions, inputs=None, targets=None):
        """One batch of this actor's schedule (interpreter.py); every message it needs
        comes over the data plane, every one it makes goes straight to its reader."""
        from .interpreter import drive, interpret, receives
        c0 = time.thread_time()
        if self._run_ended is not None:
            self._cpu["calls"] += c0 - self._run_ended
        try:
            if self._failed is not None:
                raise self._failed
            # Free what this actor sent in earlier calls, before this one allocates: a
            # flushing batch's messages were all taken within it (had it failed, the
            # coordinator rebuilt the plane, which drops them); async ones may be taken
            # in the receiver's next call, or calls later (DFA's error: take_lags).  Not
            # at the end of this call: a peer that failed mid-batch never takes them,
            # and the wait would last the timeout.
            self.plane.settle(2 if self.stage.stash else 0, self._take_lags)
            self.plane.next_call()
            self.plane.expect(receives(self, actions))
            return drive(interpret(self, actions, inputs or {}, targets or {}), self.plane)
        except BaseException as err:
            self._failed = err
            if self.plane is not None:
                self.plane.abort(f"{type(err).__name__}: {err}")
            raise
        finally:
            self._run_ended = time.thread_time()
            self._cpu["run"] += self._run_ended - c0

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
            self._order.store(key)
        if not self.is_last:
            return key, self._send_up(y, step, mb, "train")
        total = int(tmsg.header.meta.get("batch", n))
        loss_sum, correct, e = loss_and_error(y, tmsg.tensor().to(y.device), total)
        self._errors[key] = e
        stats = self._send_control("stats", DRIVER, step, {
            "mb": mb, "loss_sum": float(loss_sum), "correct": int(correct), "samples": int(n)})
        if self.broadcast_output_error and self.num_stages > 1 and self._ch_on:
            # one channel per receiving stage (its own codec state and drops)
            out = [stats]
            for j, ch in enumerate(self.ch_dfa):
                out.extend(self._send_coded(ERROR, e, ch, stage_name(j), step, mb,
                                            OUTPUT).wire())
            return key, tuple(out)
        if self.broadcast_output_error and self.num_stages > 1:
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
            key, batch, grad, e, slot = self._coded_errors(wire, step, mb, batch)
            if slot != DATA:  # WAIT: no slot yet; LOST: that forward was dropped, no update
                return self._send_errors_down(WAIT if slot == WAIT else None, batch, step, mb)
        elif self.broadcast_output_error:
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
        error, so an empty slot goes down each channel; WAIT: a waiting slot)."""
        if self.is_first or self.broadcast_output_error:
            return None
        out = []
        for i, src in enumerate(self.inputs):
            if src == DRIVER:
                continue
            dx = dxs if dxs is None or isinstance(dxs, str) else dxs[i]
            if dx is None and not (self._ch_on and dxs is None):
                # no path from this input to the output: the error is zero
                dx = torch.zeros(batch, *self.in_shapes[i], dtype=self.dtype)
            if self._ch_on:
                link = self.ch[f"{self.input_ranks[i]}:err_out"]
                out.extend(self._send_coded(ERROR, dx, link, src, step, mb, CHAIN).wire())
            else:
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
