"""`RayExecutor`: the in-process executor's interface, one Ray actor per node of the graph.

    ex = RayExecutor(cfg, input_shape, num_classes)      # or runtime.executor: ray in a config
    stats = ex.train_step(x, y, lr, wd)                   # -> engine.StepStats
    ex.evaluate(loader); ex.alignment(); ex.mirror_steps(n); ex.state_dict()
    ex.save_state(run_dir); ex.load_saved_state(run_dir, saved)   # per-actor checkpoints
    ex.ledger_summary(); ex.runtime_info(); ex.close()

The driver never touches a tensor in flight.  It interprets the schedule (gpipe / 1f1b /
async, `schedule.py`) over the actor graph (`graph.Placement`): every stage's action list
goes into a queue, and an action is issued as soon as the actions it depends on have been
issued, with the ObjectRefs those returned as arguments -- so activations and errors go
actor to actor through Ray's object store.  Each actor runs its calls in submission
order, which is exactly its schedule list.  DFA: the last actor's forward returns e, and
that one object is handed to every actor's backward.

gpipe / 1f1b: one batch at a time, one update per actor at its end -- the in-process
maths.  async: the actors' lists are streamed across batches without a flush (1F1B with a
step after every backward); `train_step` returns once the last actor has the batch's
loss, while earlier actors are still running its backward passes.  Anything that reads or
writes whole-model state first drains the stream.

A failure anywhere (a bad message, NaN in an error) propagates through the ObjectRefs:
a gpipe/1f1b step's STEP calls depend on its backwards, so a stage whose backward failed
does not update, and the driver re-raises the original `MessageError` naming edge, kind
and step.  An actor that *dies* is recreated from the last checkpoint (`save_state`), every
other actor rolls back to it too, and the step is retried: the run loses at most the
steps since that checkpoint (`runtime_info()["recoveries"]`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import deque
from pathlib import Path

import torch

from ..engine import StepStats
from ..rules import make_rule
from ..builders import as_config, build_rule_and_model
from .cost import measure_unit_costs
from .graph import Placement
from . import shm
from .ledger import Ledger
from .messages import ACTIVATION, CONTROL, TARGET, Control, Message, MessageError
from .partition import resolve_placement
from .schedule import (Action, AsyncStream, DeadlockError, call_deps, consumers, group_calls,
                       make_schedule, simulate, steps_alone, stream_staleness)
from .worker import DRIVER, StageWorker, stage_name

CHECKPOINT_DIR = "checkpoint"


def ensure_ray(runtime) -> bool:
    """Connect to runtime.address / $RAY_ADDRESS, else start an embedded local Ray.
    Returns True when this call started (and so owns) the Ray session."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Payloads are numpy arrays, which Ray already hands over zero-copy.  We leave
    # RAY_ENABLE_ZERO_COPY_TORCH_TENSORS alone: it would turn the torch tensors of returned
    # state dicts into read-only views of shared memory.
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Ray starts workers at nice 15 so that its own processes stay responsive; here
        # the actors *are* the training, and at 15 they lose every core to whatever else
        # runs on the machine.  Normal priority, unless the environment says otherwise.
        os.environ.setdefault("RAY_worker_niceness", "0")
        extra = {}
        if runtime.local_inline_bytes is not None:
            # small messages through the driver's memory instead of the object store: on
            # one machine that skips the store's create / seal / map round trips (on a
            # cluster it would route every payload through the driver, hence local only)
            extra["_system_config"] = {"max_direct_call_object_size": int(runtime.local_inline_bytes)}
        ray.init(num_cpus=runtime.local_cpus, include_dashboard=False, **extra)
    return True


def shm_threshold(runtime, *, local: bool, owns_ray: bool) -> int | None:
    """runtime.local_shm_bytes where every actor shares the driver's machine -- in this
    process, on the Ray this executor started, or on a one-node Ray on this machine --
    else None: every payload through Ray (shm.py)."""
    if runtime.local_shm_bytes is None or not shm.available():
        return None
    return int(runtime.local_shm_bytes) if local or owns_ray or _single_machine() else None


def _single_machine() -> bool:
    """True when the connected Ray is one live node, this driver's (not a Ray client)."""
    import ray

    try:
        if ray.util.client.ray.is_connected():
            return False
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == \
            ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - when unsure, leave payloads to Ray
        return False


class _Mb:
    """One micro-batch, driver side, until every actor has finished with it."""

    __slots__ = ("step", "mb", "x", "y", "n", "lr", "wd")

    def __init__(self, step, mb, x, y, n, lr, wd):
        self.step, self.mb, self.x, self.y, self.n, self.lr, self.wd = step, mb, x, y, n, lr, wd


class RayExecutor:
    name = "ray"

    def __init__(self, cfg, input_shape, num_classes: int, *, model=None, actors=None,
                 audit: bool = False, run_id: str | None = None, local: bool = False):
        """cfg: a Config (runtime section: schedule, partition, resources, address).
        model: the driver's copy, only read for its structure (built when omitted).
        actors: existing StageWorker actor handles to reuse (at least one per stage);
        the executor then neither spawns nor kills them (but replaces a dead one).
        audit: workers keep a copy of every message they receive (`audit_log()`), for
        tests.  local: no Ray at all -- plain StageWorker objects in this process, driven
        by the same schedule interpreter (for debugging and fast tests)."""
        self.cfg = cfg = as_config(cfg)
        rt = cfg.runtime
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)
        self.micro_batches = cfg.train.micro_batches
        self.timeout = rt.timeout_s
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.audit = audit
        self.local = local  # (`name` stays "ray": the same runtime, minus the transport)
        self._owns_ray = False
        self._owned: set[int] = set()
        self._pg = None
        self.workers = []

        if model is None:
            _, model = build_rule_and_model(cfg, self.input_shape, self.num_classes)
        self.unit_names = list(model.unit_names)

        def costs():
            f, b = measure_unit_costs(cfg, self.input_shape, self.num_classes, threads=rt.threads)
            return [x + y for x, y in zip(f, b)]

        self.placement: Placement = resolve_placement(rt.partition, model, costs)
        pl = self.placement
        S = self.num_stages = pl.num_actors
        self.boundaries = pl.boundaries
        self.groups = [tuple(m) for m in pl.members] if pl.kind == "units" else None
        self.graph = [list(i) for i in pl.inputs]
        self._cons = consumers(self.graph)
        self._err_index = [{slot: k for k, slot in enumerate(
            i for i, p in enumerate(ins) if p >= 0)} for ins in self.graph]
        self.schedule_name = rt.schedule
        self.is_async = rt.schedule == "async"
        self.dfa = not make_rule(cfg.rule.name, **cfg.rule.options()).sends_error
        # per stage, whether a batch's STEP is a call of its own (measuring passes may
        # run without DFA's broadcast, hence both)
        self._steps_alone = {d: steps_alone(S, d, self.graph) for d in (False, True)}
        # communication restrictions (localnet/channels): each actor encodes what it
        # sends and decodes what it receives; DFA's e then goes out once per receiver
        self.channels = cfg.channel.active() and pl.num_actors > 1
        self._ch_now = self.channels
        self._ch_samples = 0
        self.device = "cuda" if rt.num_gpus > 0 else "cpu"
        self._schedules: dict = {}
        self._plan(self.micro_batches)  # raises DeadlockError before any actor exists
        self._specs = [{"config": cfg.model_dump(mode="json"), "index": i,
                        "placement": pl.to_dict(), "input_shape": list(self.input_shape),
                        "num_classes": self.num_classes, "run": self.run_id, "audit": audit,
                        "threads": 0 if local else rt.threads, "device": self.device,
                        "stash": self.is_async} for i in range(S)]
        self.shm_bytes = None
        try:
            self._owns_ray = False if local else ensure_ray(rt)
            self.shm_bytes = shm_threshold(rt, local=local, owns_ray=self._owns_ray)
            if self.shm_bytes is not None:
                shm.sweep_orphans()  # what killed runs left in /dev/shm
            for spec in self._specs:
                spec["shm_bytes"] = self.shm_bytes
            if local:
                shared = build_rule_and_model(cfg, self.input_shape, self.num_classes)[1]
                self.workers = [_Local(StageWorker(threads=0)) for _ in range(S)]
                self.stage_info = [w._obj.setup(s, shared) for w, s in zip(self.workers, self._specs)]
                del shared
            else:
                if actors is None:
                    self.workers = self._spawn(S)
                    self._owned = set(range(S))
                else:
                    if len(actors) < S:
                        raise ValueError(f"{len(actors)} actors given for {S} stages")
                    self.workers = list(actors[:S])
                self.stage_info = self._get([w.setup.remote(s) for w, s in
                                             zip(self.workers, self._specs)], "setup")
        except BaseException:
            self.close()
            raise
        self._step = 0
        self._g = 0                       # next global micro-batch id
        self._ledger = Ledger()           # what the driver sends
        self._audit: list[dict] = []      # what the driver receives (audit mode)
        self._ckpt: Path | None = None    # the last checkpoint generation (recovery)
        self._ckpt_step = 0
        self._pre_mirror = 0              # mirror steps before any checkpoint (replayed)
        self.recoveries: list[dict] = []
        self._reset_pipeline()

    # ------------------------------------------------------------------ actors
    def _remote_class(self):
        import ray

        rt = self.cfg.runtime
        return ray.remote(num_cpus=rt.num_cpus, num_gpus=rt.num_gpus)(StageWorker)

    def _spawn(self, S: int):
        from ray.util.placement_group import placement_group

        rt = self.cfg.runtime
        # a bundle may not be all zeros: reserve a token CPU share when num_cpus is 0
        bundle = {"CPU": rt.num_cpus or 0.001, **({"GPU": rt.num_gpus} if rt.num_gpus else {})}
        self._pg = placement_group([dict(bundle) for _ in range(S)], strategy=rt.placement)
        try:
            self._get([self._pg.ready()], "placement group")
        except TimeoutError:
            raise TimeoutError(f"placement group of {S} bundles {bundle} ({rt.placement}) not "
                               f"ready within {self.timeout}s: does the cluster have the "
                               f"resources (runtime.num_cpus / num_gpus)?") from None
        return [self._spawn_one(i) for i in range(S)]

    def _spawn_one(self, i: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = self._remote_class()
        if self._pg is not None:
            remote = remote.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=i))
        return remote.remote(threads=self.cfg.runtime.threads)

    def close(self) -> None:
        """Kill the actors this executor spawned, free the placement group, and shut down
        Ray if this executor started it."""
        self._sweep()
        if self.local:
            self.workers = []
            return
        import ray

        if not ray.is_initialized():
            return
        for i, w in enumerate(self.workers):
            if i in self._owned:
                try:
                    ray.kill(w)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.workers = []
        self._owned = set()
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self._pg)
            self._pg = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def detach_actors(self) -> list:
        """Hand the actor handles over (for reuse by another executor); this executor
        stops using them and will not kill them."""
        ws, self.workers, self._owned = self.workers, [], set()
        return ws

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _get(self, refs, what: str):
        if self.local:
            return refs
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=self.timeout)
        except GetTimeoutError:
            raise TimeoutError(f"ray executor: no reply within {self.timeout}s during {what} "
                               f"(runtime.timeout_s)") from None
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, MessageError):
                raise MessageError(cause.reason, cause.src, cause.dst, cause.kind, cause.step,
                                   cause.mb) from None
            raise RuntimeError(f"a stage actor failed during {what}: "
                               f"{type(cause).__name__ if cause else ''} {cause or err}") from err
        except RayActorError as err:
            raise RuntimeError(f"a stage actor died during {what}: {err}") from err

    def _send(self, kind, tensor, dst, step, mb, detail, meta=None) -> tuple:
        msg = Message.make(kind, tensor, src=DRIVER, dst=dst, step=step, mb=mb, run=self.run_id,
                           detail=detail, meta=meta)
        if self.shm_bytes is not None:
            msg = msg.via_shm(self.run_id, self.shm_bytes)
        self._ledger.record(DRIVER, dst, kind, msg.header_bytes, msg.payload_bytes)
        return msg.wire()

    def _control(self, op, s, step, **args) -> bytes:
        raw = Control(op, src=DRIVER, dst=stage_name(s), step=step, run=self.run_id,
                      args=args).encode()
        self._ledger.record(DRIVER, stage_name(s), CONTROL, len(raw), 0)
        return raw

    def _stats(self, raw: bytes) -> dict:
        c = Control.decode(raw, "stats")
        if self.audit:
            self._audit.append({"src": c.src, "dst": DRIVER, "kind": CONTROL, "detail": "stats",
                                "step": c.step, "mb": c.args.get("mb", -1),
                                "header_bytes": len(raw), "payload_bytes": 0, "payload": None})
        return c.args

    def _broadcast(self, op, step=None, **args):
        step = self._step if step is None else step
        return self._get([w.control.remote(self._control(op, s, step, **args))
                          for s, w in enumerate(self.workers)], op)

    def _schedule(self, name: str, M: int):
        key = (name, M)
        if key not in self._schedules:
            graph = None if self.placement.is_chain else self.graph
            self._schedules[key] = make_schedule(name, self.num_stages, M, graph)
        return self._schedules[key]

    def _plan(self, M: int):
        """Dry-run every schedule this executor may issue (its own, and 1f1b for
        measuring passes), so a deadlock is found before any actor exists."""
        for name in {self.schedule_name, "1f1b"}:
            for dfa in {self.dfa, False}:
                simulate(self._schedule(name, M), 1.0, 1.0, dfa=dfa)
        return self._schedule(self.schedule_name, M)

    def _recover(self) -> None:
        """After a failed step: clear every stage's in-flight state (best effort)."""
        self._reset_pipeline()
        try:
            self._get([w.reset.remote() for w in self.workers], "reset")
        except Exception:  # noqa: BLE001 - the original error is what matters
            pass
        self._sweep()

    def _sweep(self) -> None:
        """Delete the shared-memory payloads a failed step left unread (shm.py)."""
        if self.shm_bytes is not None:
            shm.sweep(self.run_id)

    # ------------------------------------------------------------------ the interpreter
    def _reset_pipeline(self) -> None:
        S = self.num_stages
        self._queues: list[deque] = [deque() for _ in range(S)]
        self._issued: set = set()
        self._mbs: dict[int, _Mb] = {}
        self._acts: dict = {}
        self._errs: dict = {}
        self._e: dict = {}
        self._left: dict = {}             # ("a"|"e"|"x", s, g) -> consumers still to issue
        self._stats_refs: dict = {}
        self._bwd: dict = {}              # (s, g) -> first ref of B(s, g)
        # (s, g) -> the header refs F(s, g) and B(s, g) took from other actors.  A call
        # that follows another on the same actor gets no reference to it (Ray runs one
        # submitter's calls in order; a reference would cost a round trip through the
        # driver); it gets these instead -- resolved already, so free -- and fails with
        # them when an upstream call failed and its own predecessor never ran.  A failure
        # on the actor itself poisons it (worker.py).
        self._hdrs: dict = {}
        self._step_refs: list = []
        self._outstanding: list = []      # async: STEP refs not yet checked
        self._steps_done: dict[int, int] = {}
        self._dfa_now = self.dfa
        depth = stream_staleness(self.graph, S)
        self._streams = [AsyncStream(depth[s], self._g if hasattr(self, "_g") else 0)
                         for s in range(S)]

    def _release(self, key, table) -> None:
        """One more consumer has issued its call with table[key]: drop the ref after
        the last one, so the object store may free the tensor."""
        self._left[key] -= 1
        if self._left[key] == 0:
            del self._left[key]
            del table[key[1:] if len(key) > 2 else key[1]]

    def _issue(self, s: int, call: tuple, batch) -> None:
        """Issue one call of stage s: F, B or STEP alone, or a group of them
        (`schedule.group_calls`): F B [STEP] on the last stage, B STEP anywhere."""
        w, head = self.workers[s], call[0]
        step = call[-1] if call[-1].op == "STEP" else None
        if head.op == "STEP":
            raw, deps = self._step_control(s, head, batch)
            self._stepped(s, head, batch, w.control.remote(raw, *deps))
        elif head.op == "F" and s == self.num_stages - 1:
            self._issue_last(w, head.mb, call, step, batch)
        elif head.op == "F":
            self._acts[(s, head.mb)] = w.forward.options(num_returns=2).remote(
                *self._forward_wire(s, head.mb))
            self._left[("a", s, head.mb)] = len(self.placement.consumers[s])
        else:
            self._issue_backward(s, head.mb, step, batch)

    def _forward_wire(self, s: int, g: int) -> list:
        """F(s, g)'s arguments: its input activations (+ the targets on the last actor)."""
        ctx, wire = self._mbs[g], []
        hdrs = self._hdrs.setdefault((s, g), [])
        for p in self.placement.inputs[s]:
            if p < 0:
                wire += self._send(ACTIVATION, ctx.x, stage_name(s), ctx.step, ctx.mb, "input")
            else:
                wire += self._acts[(p, g)]
                hdrs.append(self._acts[(p, g)][0])
                self._release(("a", p, g), self._acts)
        if s == self.num_stages - 1:
            wire += self._send(TARGET, ctx.y, stage_name(s), ctx.step, ctx.mb, "train",
                               meta={"batch": ctx.n})
        return wire

    def _then(self, s: int, step: Action | None, batch) -> tuple[dict, list]:
        """For a call that ends with `step`: the keyword that runs it, and the references
        it must wait for (built after the call's own wire, whose headers are among them)."""
        if step is None:
            return {}, []
        raw, deps = self._step_control(s, step, batch)
        return {"then": raw}, deps

    def _issue_last(self, w, g: int, call: tuple, step: Action | None, batch) -> None:
        """The last actor's forward (its stats, and DFA's e), with the backward of the
        same micro-batch in the same call when the schedule groups them (then the
        errors it sends down follow), and the STEP after that."""
        S, s = self.num_stages, self.num_stages - 1
        fused = len(call) > 1 and call[1].op == "B"
        wire = self._forward_wire(s, g)
        then, deps = self._then(s, step, batch)
        n = 1
        if self._dfa_now and S > 1:
            n = 1 + 2 * (S - 1) if self._ch_now else 3
        nerr = 0 if self._dfa_now or not fused else len(self._err_index[s])
        r = w.forward.options(num_returns=n + 2 * nerr).remote(
            *wire, *deps, backward=fused, deps=len(deps), **then)
        r = list(r) if n + 2 * nerr > 1 else [r]
        self._stats_refs[g] = r[0]
        if n > 1:
            self._e[g] = tuple(r[1:n])
            self._left[("e", g)] = S - 1
        if fused:
            self._backward_done(s, g, r[n:], r[0])
        if step is not None:
            self._stepped(s, step, batch, r[0])

    def _issue_backward(self, s: int, g: int, step: Action | None, batch) -> None:
        """B(s, g), alone or with the STEP after it."""
        ctx, pl = self._mbs[g], self.placement
        nerr = 0 if self._dfa_now else len(self._err_index[s])
        hdrs = self._hdrs.setdefault((s, g), [])
        wire, extra = [], []
        if s == self.num_stages - 1:
            # after its forward (same actor, in order); fails with the forward's inputs
            extra = list(hdrs)
        elif self._dfa_now:
            e = self._e[g]
            wire = list(e[2 * s:2 * s + 2] if self._ch_now else e)
            hdrs.append(wire[0])
            self._release(("e", g), self._e)
        else:
            for c, slot in pl.consumers[s]:
                er, k = self._errs[(c, g)], self._err_index[c][slot]
                wire += [er[2 * k], er[2 * k + 1]]
                hdrs.append(er[2 * k])
                self._release(("x", c, g), self._errs)
        then, deps = self._then(s, step, batch)
        extra += deps
        r = self.workers[s].backward.options(num_returns=max(2 * nerr, 1)).remote(
            ctx.step, ctx.mb, *wire, *extra, deps=len(extra), **then)
        refs = list(r) if nerr else [r]
        self._backward_done(s, g, refs[:2 * nerr], refs[0])
        if step is not None:
            self._stepped(s, step, batch, refs[0])

    def _backward_done(self, s: int, g: int, errs: list, first) -> None:
        if errs:
            self._errs[(s, g)] = tuple(errs)
            self._left[("x", s, g)] = len(errs) // 2
        self._bwd[(s, g)] = first

    def _step_control(self, s: int, a: Action, batch) -> tuple[bytes, list]:
        """The STEP's control message, and the references it must wait for: the inputs
        of this stage's calls for the batch (a call whose input failed never ran, and
        the update must not apply the rest alone)."""
        if a.mb < 0:
            step, lr, wd, gs = batch
            deps = [h for gg in gs for h in self._hdrs.pop((s, gg), [])]
            return self._control("step", s, step, lr=lr, wd=wd), deps
        ctx = self._mbs[a.mb]
        return (self._control("step", s, ctx.step, lr=ctx.lr, wd=ctx.wd),
                self._hdrs.pop((s, a.mb), []))

    def _stepped(self, s: int, a: Action, batch, ref) -> None:
        """Bookkeeping once the STEP `a` of stage s is issued (alone or in a call)."""
        S = self.num_stages
        if a.mb < 0:
            for gg in batch[3]:
                del self._bwd[(s, gg)]
            self._step_refs.append(ref)
            return
        g = a.mb
        del self._bwd[(s, g)]
        self._outstanding.append(ref)
        self._steps_done[g] = self._steps_done.get(g, 0) + 1
        if self._steps_done[g] == S:  # every actor is done with g
            del self._steps_done[g], self._mbs[g]
            for st in range(S):
                self._issued.discard((st, Action("F", g)))
                self._issued.discard((st, Action("B", g)))

    def _pump(self) -> None:
        """Issue every queued call whose dependencies have been issued, until none is
        left that can go; each stage's queue strictly in order.  (In-process, `local`,
        the calls run here and now, so a bad message fails right here.)"""
        try:
            self._issue_ready()
        except BaseException:
            self._recover()
            raise

    def _issue_ready(self) -> None:
        S = self.num_stages
        progressed = True
        while progressed:
            progressed = False
            for s in range(S):
                q = self._queues[s]
                while q:
                    call, batch = q[0]
                    # (M=0: a STEP's own backwards were issued before it, in order)
                    deps = call_deps(s, call, S, 0, self._dfa_now, self.graph, self._cons)
                    if any(d not in self._issued for d in deps):
                        break
                    q.popleft()
                    self._issued.update((s, a) for a in call if a.op != "STEP")
                    self._issue(s, call, batch)  # (an async STEP may forget g again)
                    progressed = True
        stuck = [(s, q[0][0][0], []) for s, q in enumerate(self._queues) if q]
        if stuck:
            self._reset_pipeline()
            raise DeadlockError(stuck)

    def _enqueue(self, s: int, actions, batch, streamed: bool = False) -> None:
        """Queue stage s's actions as the calls that will run them (`Schedule.calls`:
        streamed async keeps the last actor's forward alone, its loss is what
        train_step waits for)."""
        last = s == self.num_stages - 1 and not streamed
        alone = self._steps_alone[self._dfa_now][s]
        self._queues[s].extend((c, batch) for c in group_calls(actions, last, alone))

    def _micro_batches(self, x, y, step, lr=0.0, wd=0.0) -> list[int]:
        xs, ys = x.chunk(self.micro_batches), y.chunk(self.micro_batches)
        base, n = self._g, x.shape[0]
        self._g += len(xs)
        for m, (xm, ym) in enumerate(zip(xs, ys)):
            self._mbs[base + m] = _Mb(step, m, xm, ym, n, lr, wd)
        return list(range(base, self._g))

    def _collect(self, refs, M: int, what: str) -> StepStats:
        try:
            out = self._get(refs, what)
        except BaseException:
            self._recover()
            raise
        st = StepStats(0.0, 0, 0)
        for raw in out[:M]:
            d = self._stats(raw)
            st.loss_sum += d["loss_sum"]
            st.correct += d["correct"]
            st.samples += d["samples"]
        return st

    def _run(self, x, y, step: int, step_args: dict | None, dfa: bool | None = None,
             schedule: str | None = None) -> StepStats:
        """One batch through a flushing schedule (gpipe / 1f1b); STEP actions only when
        step_args is given."""
        self._drain()
        self._dfa_now = self.dfa if dfa is None else dfa
        name = schedule or (self.schedule_name if not self.is_async else "1f1b")
        lr, wd = (step_args or {}).get("lr", 0.0), (step_args or {}).get("wd", 0.0)
        gs = self._micro_batches(x, y, step, lr, wd)
        M, base = len(gs), gs[0]
        batch = (step, float(lr), float(wd), gs)
        for stream in self._streams:  # (async) the stream goes on after these ids
            stream.restart(self._g)
        for s, acts in enumerate(self._schedule(name, M).stages):
            self._enqueue(s, [a if a.op == "STEP" else Action(a.op, base + a.mb) for a in acts
                              if a.op != "STEP" or step_args is not None], batch)
        self._pump()
        refs = [self._stats_refs.pop(g) for g in gs]
        refs += self._step_refs if step_args is not None else [self._bwd.pop(k) for k in
                                                              list(self._bwd)]
        self._step_refs = []
        self._issued.clear()
        for g in gs:
            self._mbs.pop(g, None)
            for s in range(self.num_stages):
                self._hdrs.pop((s, g), None)
        try:
            return self._collect(refs, M, f"step {step}")
        finally:
            self._dfa_now = self.dfa

    def _run_async(self, x, y, step: int, lr: float, wd: float) -> StepStats:
        """Stream one batch into the async pipeline; returns when the last actor has its
        loss.  Each micro-batch's update uses lr and wd/M (M updates make one batch's)."""
        gs = self._micro_batches(x, y, step, float(lr), float(wd) / self.micro_batches)
        for s, stream in enumerate(self._streams):
            self._enqueue(s, stream.take(self._g), None, streamed=True)
        self._pump()
        st = self._collect([self._stats_refs.pop(g) for g in gs], len(gs), f"step {step}")
        self._check_outstanding()
        return st

    def _check_outstanding(self) -> None:
        """Surface errors of finished async updates without waiting for the rest."""
        if self.local or not self._outstanding:
            self._outstanding = []
            return
        import ray

        ready, rest = ray.wait(self._outstanding, num_returns=len(self._outstanding), timeout=0)
        self._outstanding = rest
        if ready:
            try:
                self._get(ready, f"step {self._step}")
            except BaseException:
                self._recover()
                raise

    def _drain(self) -> None:
        """async: finish every micro-batch in flight (their backwards and updates)."""
        if not self.is_async:
            return
        if self._streams and self._streams[0].start < self._g:
            for s, stream in enumerate(self._streams):
                self._enqueue(s, stream.drain(self._g), None, streamed=True)
            self._pump()
        refs, self._outstanding = self._outstanding, []
        if refs:
            try:
                self._get(refs, "drain")
            except BaseException:
                self._recover()
                raise

    def flush(self) -> None:
        """Wait until every issued step has finished (async: drain the stream)."""
        self._drain()

    # ------------------------------------------------------------------ training
    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, wd: float) -> StepStats:
        self._step += 1
        self._ch_samples += int(x.shape[0])
        while True:
            try:
                if self.is_async:
                    return self._run_async(x, y, self._step, lr, wd)
                return self._run(x, y, self._step, {"lr": float(lr), "wd": float(wd)})
            except MessageError:
                raise
            except Exception as err:  # noqa: BLE001 - an actor may have died
                if not self._revive(err):
                    raise

    def _channels(self, on: bool) -> None:
        """Measuring passes bypass the channels (as in-process): no codec state, drop
        draws or delay slots are spent on them."""
        if self.channels and self._ch_now != on:
            self._drain()
            self._get([w.set_channels.remote(on) for w in self.workers], "channels")
            self._ch_now = on

    def channel_summary(self) -> dict | None:
        """As InProcessExecutor.channel_summary: bytes per edge and kind, bytes and bits
        per sample -- from the sending and receiving halves in the actors."""
        if not self.channels:
            return None
        from ..channels.channel import summarize

        self._drain()
        parts = self._get([w.channel_stats.remote() for w in self.workers], "channel stats")
        recv = {(d["kind"], d["edge"]): d for p in parts for d in p["recv"]}
        kinds: dict[str, list] = {"activation": [], "error": []}
        sends = sorted((d for p in parts for d in p["send"]), key=lambda d: d["edge"])
        n = self._ch_samples
        for d in sends:
            r = recv.get((d["kind"], d["edge"]), {})
            row = {**d, "delivered": r.get("delivered", 0),
                   "not_yet_arrived": r.get("not_yet_arrived", 0),
                   "bytes_per_sample": d["bytes"] / n if n else 0.0}
            del row["ledger"]
            kinds[row.pop("kind")].append(row)
        ledger = Ledger.merged(d["ledger"] for d in sends)
        return summarize(kinds["activation"], kinds["error"], n, self.dfa, ledger)

    def forward_backward(self, x, y, stats: StepStats) -> None:
        """Forward and backward of one batch, gradients left in the stages (no step)."""
        self._channels(False)
        try:
            st = self._run(x, y, self._step + 1, None)
        finally:
            self._channels(True)
        stats.loss_sum += st.loss_sum
        stats.correct += st.correct
        stats.samples += st.samples

    def bp_update_angles(self, x, y) -> dict[str, float]:
        """As InProcessExecutor.bp_update_angles: angle between each layer's update under
        its rule and the BP gradient on the same batch; BatchNorm statistics restored."""
        from ..alignment import update_angles

        self._drain()
        self._channels(False)
        self._get([w.probe_begin.remote() for w in self.workers], "probe")
        try:
            grads = []
            for rule in (None, "bp"):
                self._get([w.probe_rule.remote(rule) for w in self.workers], "probe")
                self._run(x, y, self._step + 1, None, dfa=self.dfa if rule is None else False)
                g = {}
                for d in self._get([w.weight_grads.remote() for w in self.workers], "probe"):
                    g.update(d)
                grads.append(g)
        finally:
            self._get([w.probe_end.remote() for w in self.workers], "probe")
            self._channels(True)
        return update_angles(grads[0], grads[1])

    def evaluate(self, loader) -> tuple[float, float]:
        """Loss and accuracy through the same actors, forward only, a few batches in
        flight at a time."""
        while True:
            try:
                return self._evaluate(loader)
            except MessageError:
                raise
            except Exception as err:  # noqa: BLE001
                if not self._revive(err):
                    raise

    def _evaluate(self, loader) -> tuple[float, float]:
        self._drain()
        self._broadcast("mode", train=False)
        S, last, pl = self.num_stages, self.num_stages - 1, self.placement
        loss, correct, n = 0.0, 0, 0
        pending: deque = deque()

        def collect():
            nonlocal loss, correct, n
            d = self._stats(self._get(pending.popleft(), f"evaluation at step {self._step}"))
            loss, correct, n = loss + d["loss_sum"], correct + d["correct"], n + d["samples"]

        try:
            for i, (x, y) in enumerate(loader):
                outs = {}
                for s in range(S):
                    wire = []
                    for p in pl.inputs[s]:
                        wire += (self._send(ACTIVATION, x, stage_name(s), self._step, i, "eval")
                                 if p < 0 else outs[p])
                    if s < last:
                        outs[s] = self.workers[s].infer.options(num_returns=2).remote(*wire)
                    else:
                        wire += self._send(TARGET, y, stage_name(last), self._step, i, "eval")
                        pending.append(self.workers[last].infer.remote(*wire))
                if len(pending) > S:
                    collect()
            while pending:
                collect()
        finally:
            self._broadcast("mode", train=True)
        return loss / max(n, 1), correct / max(n, 1)

    def train(self, mode: bool) -> None:
        self._broadcast("mode", train=bool(mode))

    def mirror_steps(self, n: int) -> None:
        if n:
            self._drain()
            self._broadcast("mirror", n=int(n))
            if self._ckpt is None:
                self._pre_mirror += int(n)

    # ------------------------------------------------------------------ metrics and state
    def alignment(self) -> dict:
        out = {}
        for d in self._get([w.alignment.remote() for w in self.workers], "alignment"):
            out.update(d)
        return out

    def _layout(self) -> dict:
        return {"executor": self.name, "boundaries": self.boundaries,
                "placement": self.placement.to_dict(), "step": self._step}

    def state_dict(self) -> dict:
        """Every stage's state, gathered on the driver (small models, tests); training
        checkpoints use `save_state`, where each actor writes its own file."""
        self._drain()
        return {"stages": self._get([w.state_dict.remote() for w in self.workers], "state_dict"),
                **self._layout()}

    def _check_layout(self, state: dict, n: int) -> None:
        pl = state.get("placement")
        same = (Placement.from_dict(pl).same_layout(self.placement) if pl is not None
                else state.get("boundaries", self.boundaries) == self.boundaries)
        if n != self.num_stages or not same:
            raise ValueError(f"checkpoint has {n} stages (boundaries {state.get('boundaries')}"
                             f"); this runtime has {self.num_stages} (boundaries "
                             f"{self.boundaries}): use the same runtime.partition")

    def load_state_dict(self, state: dict) -> None:
        stages = state["stages"]
        self._check_layout(state, len(stages))
        self._drain()
        self._get([w.load_state_dict.remote(st) for w, st in zip(self.workers, stages)],
                  "load_state_dict")
        self._step = int(state.get("step", self._step))

    def save_state(self, run_dir) -> dict:
        """Checkpoint: every actor writes its own state (weights, feedback weights,
        optimizer state, RNG) to <run_dir>/checkpoint/step-<N>/<actor>.pt, then the
        driver writes the manifest.  Returns the small record train.py keeps in
        checkpoint.pt; the actors' files never pass through the driver.  The last two
        generations are kept, so a crash while saving leaves the previous one intact."""
        self._drain()
        root = Path(run_dir).resolve() / CHECKPOINT_DIR
        gen = root / f"step-{self._step:09d}"
        receipts = self._get([w.save_checkpoint.remote(str(gen)) for w in self.workers],
                             "checkpoint")
        manifest = {"version": 1, "run_id": self.run_id, "step": self._step,
                    "time": time.time(), "schedule": self.schedule_name,
                    "micro_batches": self.micro_batches, **self._layout(), "actors": receipts,
                    "bytes": sum(r["bytes"] for r in receipts)}
        _write_json(gen / "manifest.json", manifest)
        _write_json(root / "manifest.json", {**manifest, "generation": gen.name})
        gens = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in gens[:-2]:
            if old != gen:
                shutil.rmtree(old, ignore_errors=True)
        self._ckpt, self._ckpt_step = gen, self._step
        return {"executor": self.name, "checkpoint": f"{CHECKPOINT_DIR}/{gen.name}",
                "step": self._step, "bytes": manifest["bytes"], **self._layout()}

    def load_saved_state(self, run_dir, saved: dict) -> None:
        """Resume from what `save_state` returned: each actor loads its own file."""
        if "stages" in saved:  # a checkpoint gathered on the driver (state_dict)
            self.load_state_dict(saved)
            return
        gen = Path(run_dir).resolve() / saved["checkpoint"]
        manifest = json.loads((gen / "manifest.json").read_text())
        self._check_layout(manifest, len(manifest["actors"]))
        self._drain()
        self._get([w.load_checkpoint.remote(str(gen)) for w in self.workers], "resume")
        self._step = int(manifest["step"])
        self._ckpt, self._ckpt_step = gen, self._step

    def model_state_dict(self) -> dict:
        """The full model's state dict ("units.<i>...."), gathered from the stages."""
        self._drain()
        out = {}
        for d in self._get([w.unit_state.remote() for w in self.workers], "unit_state"):
            out.update(d)
        return out

    # ------------------------------------------------------------------ recovery
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
                raise TimeoutError(f"{stage_name(i)} does not answer a ping within "
                                   f"{self.timeout}s") from None
        return dead

    def _revive(self, err: BaseException) -> bool:
        """After a failed call: if actors died, recreate them and roll every actor back
        to the last checkpoint (or to the start); True when the call may be retried."""
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
        for i in dead:
            try:
                ray.kill(self.workers[i])
            except Exception:  # noqa: BLE001
                pass
            self.workers[i] = self._spawn_one(i)
            self._owned.add(i)
        self._reset_pipeline()
        self._get([self.workers[i].setup.remote(self._specs[i]) for i in dead], "recovery setup")
        if self._ckpt is not None:
            self._get([w.load_checkpoint.remote(str(self._ckpt)) for w in self.workers],
                      "recovery")
            restored = self._ckpt_step
        else:  # no checkpoint yet: every actor back to its initial state
            alive = [i for i in range(self.num_stages) if i not in dead]
            self._get([self.workers[i].setup.remote(self._specs[i]) for i in alive],
                      "recovery setup")
            if self._pre_mirror:
                self._broadcast("mirror", n=self._pre_mirror)
            restored = 0
        self.stage_info = self._get([w.info.remote() for w in self.workers], "info")
        self.recoveries.append({
            "at_step": self._step, "dead": [stage_name(i) for i in dead],
            "restored_step": restored, "lost_steps": max(self._step - 1 - restored, 0),
            "checkpoint": str(self._ckpt) if self._ckpt else None,
            "error": f"{type(err).__name__}: {err}"[:300],
            "seconds": time.perf_counter() - t0})
        return True

    # ------------------------------------------------------------------ observability
    def stage_timings(self, clear: bool = True) -> list[dict]:
        """Per stage, `StageWorker.timings()`: call times since the last call (metrics)."""
        return self._get([w.timings.remote(clear) for w in self.workers], "timings")

    def ledger(self) -> Ledger:
        led = Ledger().merge(self._ledger)
        for d in self._get([w.ledger.remote() for w in self.workers], "ledger"):
            led.merge(Ledger.from_dict(d))
        return led

    def ledger_summary(self) -> dict:
        return self.ledger().run_summary()

    def reset_ledger(self) -> None:
        self._ledger.clear()
        self._get([w.ledger.remote(clear=True) for w in self.workers], "ledger")

    def audit_log(self, clear: bool = True) -> list[dict]:
        """Every message received by a stage or the driver since the last call (audit=True)."""
        out = list(self._audit)
        for log in self._get([w.audit_log.remote(clear) for w in self.workers], "audit"):
            out.extend(log)
        if clear:
            self._audit.clear()
        return out

    def inject_fault(self, stage: int, kind: str, mode: str, step: int | None = None,
                     mb: int | None = None) -> None:
        """Test hook: stage `stage` corrupts its next outgoing `kind` message."""
        self._get(self.workers[stage].inject_fault.remote(kind, mode, step, mb), "inject_fault")

    def staleness(self) -> list[int]:
        """Per actor: how many updates its forward of a micro-batch may be missing
        (0: gpipe / 1f1b).  async: d(s), the edges on the longest path from the actor to
        the last one -- at most the pipeline depth minus one."""
        if not self.is_async:
            return [0] * self.num_stages
        return stream_staleness(self.graph, self.num_stages)

    def runtime_info(self) -> dict:
        sched = self._schedule(self.schedule_name, self.micro_batches)
        sim = simulate(sched, 1.0, 1.0, dfa=self.dfa)
        stale = self.staleness()
        pl = self.placement
        return {"executor": "local" if self.local else self.name, "actors": self.num_stages,
                "schedule": self.schedule_name, "micro_batches": self.micro_batches,
                "staleness": max(stale), "staleness_per_actor": stale,
                "staleness_unit": "optimizer updates (one per micro-batch) missing from a "
                                  "forward pass; 0 = the in-process maths",
                "partition": pl.spec, "stages": self.num_stages,
                "pipeline_depth": max(stream_staleness(self.graph, self.num_stages)) + 1,
                "boundaries": self.boundaries,
                "units": [list(n) for n in pl.names],
                "edges": [list(e) for e in pl.edges()],
                "dfa_broadcast": self.dfa, "placement": self.cfg.runtime.placement,
                "num_cpus": self.cfg.runtime.num_cpus, "num_gpus": self.cfg.runtime.num_gpus,
                "devices": sorted({i.get("device", "cpu") for i in self.stage_info}),
                "bubble_fraction_equal_costs": sim.bubble_fraction,
                "ray_address": None if self.local else _ray_address(),
                "actor_info": self.stage_info, "run_id": self.run_id, "step": self._step,
                "checkpoint": str(self._ckpt) if self._ckpt else None,
                "recoveries": list(self.recoveries)}


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def _ray_address():
    import ray

    return ray.get_runtime_context().gcs_address


class _Local:
    """Stands in for an actor handle in local mode: `h.method.options(...).remote(*a)`
    calls the method at once (the interpreter issues calls in dependency order)."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        return _LocalMethod(getattr(self._obj, name))


class _LocalMethod:
    def __init__(self, fn):
        self._fn = fn

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        return self._fn(*args, **kwargs)
