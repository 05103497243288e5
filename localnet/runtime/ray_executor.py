"""`RayExecutor`, the coordinator: the in-process executor's interface, one Ray actor per
node of the actor graph.

    ex = RayExecutor(cfg, input_shape, num_classes)      # or runtime.executor: ray in a config
    stats = ex.train_step(x, y, lr, wd)                   # -> engine.StepStats
    ex.evaluate(loader); ex.alignment(); ex.mirror_steps(n); ex.state_dict()
    ex.save_state(run_dir); ex.load_saved_state(run_dir, saved)   # per-actor checkpoints
    ex.ledger_summary(); ex.runtime_info(); ex.close()

The coordinator places the actors, sets up the data plane among them (`plane.py`), and
then issues **one call per actor per batch**: the actor's own action list for it
(`localnet/schedules`), the inputs to the first actor and the targets to the last.  Each actor
interprets its list itself (`interpreter.py`): activations and errors go from actor to
actor, never through here.  The coordinator only collects the losses.

gpipe / 1f1b: it waits for every actor's call -- the in-process maths, one update per
batch.  async: the lists are streamed across batches without a flush (`streamed`),
and `train_step` returns once the last actor has finished the batch, with earlier actors
still running its backward passes; anything that reads or writes whole-model state
drains the stream first.

A failure (a bad message, NaN in an error, a silent peer) fails the actor that saw it,
which tells every other actor over the plane; the coordinator re-raises that actor's own
error (a `MessageError` naming edge, kind and step), resets the actors and rebuilds the
plane.  An actor that *dies* is recreated in its bundle, every actor reloads the last
checkpoint, and the step is retried: the run loses at most the steps since then.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import torch

from ..builders import as_config, build_rule_and_model
from ..engine import StepStats
from ..files import counted
from ..rules import RULES
from . import memory, placement, session
from .cost import unit_costs
from .endpoint import check_channel_graph
from .executor_state import StateMixin, keeps_traffic, recovering
from .graph import Placement
from .interpreter import drive_all, interpret
from ..ledger import Ledger
from .messages import ACTIVATION, DRIVER, TARGET, Message, stage_name
from .partition import resolve_placement
from .polls import PollMixin
from .local_plane import LocalHandle, LocalPlane
from .recovery import RecoveryMixin, Replay
from .stream import StreamMixin
from ..schedules import SCHEDULES, make_schedule, simulate
from .session import ensure_ray  # noqa: F401 - the public name (sweep.py)
from .worker import StageWorker, worker_specs


class RayExecutor(StateMixin, PollMixin, RecoveryMixin, StreamMixin):
    name = "ray"

    def __init__(self, cfg, input_shape, num_classes: int, *, model=None, actors=None,
                 audit: bool = False, run_id: str | None = None, local: bool = False,
                 on_phase=None):
        """cfg: a Config (runtime section: schedule, partition, resources, address).
        model: the driver's copy, only read for its structure (built when omitted).
        actors: existing StageWorker actor handles to reuse (at least one per stage);
        the executor then neither spawns nor kills them (but replaces a dead one).
        audit: workers keep a copy of every message they receive (`audit_log()`), for
        tests.  local: no Ray at all -- plain StageWorker objects in this process, the
        same interpreter over in-process queues (for debugging and fast tests).
        on_phase: called with a line saying what start-up is doing now (a progress
        display: starting the actors takes a while, and nothing else shows)."""
        t0 = time.perf_counter()
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
        self._placer = None
        self.workers = []
        self.device_peers: list[list[int]] = []  # per actor, whom it reaches on the device
        self.memory: dict | None = None   # the preflight's estimate (runtime/memory.py)
        phases: dict[str, float] = {}

        if model is None:
            _, model = build_rule_and_model(cfg, self.input_shape, self.num_classes)
        self.unit_names = list(model.unit_names)

        self.placement: Placement = resolve_placement(
            rt.partition, model, unit_costs(cfg, self.input_shape, self.num_classes))
        pl = self.placement
        S = self.num_stages = pl.num_actors
        self.boundaries = pl.boundaries
        self.groups = [tuple(m) for m in pl.members] if pl.kind == "units" else None
        self.graph = [list(i) for i in pl.inputs]
        self.first = [s for s in range(S) if -1 in pl.inputs[s]]
        self.schedule_name = rt.schedule.name
        self._sched_options = rt.schedule.options()
        self._sched = SCHEDULES.get(self.schedule_name)(**self._sched_options)
        self.streamed = self._sched.streamed
        # the passes that must not update (evaluation, probes) flush
        self.flush_name = self._sched.flush_with or self.schedule_name
        self.broadcast_output_error = RULES.get(cfg.rule.name).broadcast_output_error
        self.channels = cfg.channel.active() and pl.num_actors > 1
        if self.channels:  # before any actor starts
            check_channel_graph(cfg.channel, pl, list(model.unit_names))
        self._ch_now = self.channels
        self._ch_samples = 0
        self.device = "cuda" if rt.num_gpus > 0 else "cpu"
        self._schedules: dict = {}
        self._plan(self.micro_batches)  # raises DeadlockError before any actor exists
        self._specs = worker_specs(cfg, pl, model, self.input_shape, self.num_classes,
                                   run=self.run_id, audit=audit,
                                   threads=0 if local else rt.threads, device=self.device,
                                   stash=self.streamed)
        try:
            if local:
                shared = build_rule_and_model(cfg, self.input_shape, self.num_classes)[1]
                self.workers = [LocalHandle(StageWorker(threads=0)) for _ in range(S)]
                self.stage_info = [w._obj.setup(s, shared) for w, s in zip(self.workers, self._specs)]
                del shared
            else:
                say = on_phase or (lambda text: None)
                say("connecting to Ray" if rt.address else "starting a local Ray")
                self._owns_ray = ensure_ray(rt, S)
                phases["ray_init"] = time.perf_counter()
                self._placer = placement.Placer(rt, self.timeout)
                if actors is None and rt.memory_preflight:  # before any actor starts
                    peak = simulate(self._schedule(self.schedule_name, self.micro_batches),
                                    1.0, 1.0, dfa=self.broadcast_output_error).peak_activations
                    self.memory = memory.check(cfg, pl, model, self.input_shape, peak)
                tell = lambda n: say(f"starting {counted(S, 'actor')} (each imports "  # noqa: E731
                                     f"torch, builds its part): {n}/{S} ready")
                if actors is None:
                    say(f"placing {counted(S, 'actor')}")
                    self._placer.reserve(S)
                    phases["placement"] = time.perf_counter()
                    self._owned = set(range(S))  # close() kills each one as it starts
                    refs, waited = self._placer.start(StageWorker, self._specs,
                                                      placement.start_window(rt), tell,
                                                      self.workers)
                else:
                    if len(actors) < S:
                        raise ValueError(f"{len(actors)} actors given for {S} stages")
                    self.workers = list(actors[:S])
                    refs = [w.setup.remote(s) for w, s in zip(self.workers, self._specs)]
                    waited = session.count_ready(refs, self.timeout, tell) if on_phase else 0.0
                self.stage_info = session.get(refs, self.timeout, "setup", waited)
                phases["actors_built"] = time.perf_counter()
                say("connecting the actors' data plane")
            self._open_plane()
        except BaseException:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - e.g. Ray half-imported when Ctrl-C came:
                pass           # what stopped the start-up is the error to report
            raise
        phases["plane"] = time.perf_counter()
        self.startup_s = time.perf_counter() - t0  # until every actor is ready
        self._cpu0 = time.process_time()  # runtime_info's coordinator_cpu_s
        self._cpu_taken: Counter = Counter()  # the actors' CPU account, as polled
        self._asked = None  # a metrics poll's calls, read at the next (polls.py)
        # where start-up went: each phase's seconds since the previous one (the actors
        # start their processes and import torch between "placement" and "actors_built")
        marks = [("start", t0)] + list(phases.items())
        self.startup_phases = {k: round(t - marks[i][1], 2)
                               for i, (k, t) in enumerate(marks[1:])}
        self._step = 0
        self._g = 0                       # next global micro-batch id (async streams)
        self._mb: dict[int, tuple] = {}   # async: g -> (step, mb, lr, wd)
        self._outstanding: list = []      # replies not yet checked (_last_reply)
        self._ledger = Ledger()           # what the driver sends (after a recovery: all)
        self._ckpt_ledger, self._kept, self._kept_from = Ledger(), Ledger(), None  # recovery.py
        self._audit: list[dict] = []      # what the driver receives (audit mode)
        self._ckpt = None                 # the last checkpoint generation (recovery)
        self._ckpt_step = 0
        self._pre_mirror = 0              # mirror steps before any checkpoint (replayed)
        self.recoveries: list[dict] = []
        self._replay = Replay()  # the batches since the last checkpoint (recovery replays them)
        self.calls = 0                    # driver-issued actor calls for batches
        self.calls_trained = 0            # of them, the calls that carried training batches,
        self.calls_batches = 0            # and how many batches those carried
        self._new_streams()

    # ------------------------------------------------------------------ actors and plane
    def _open_plane(self) -> None:
        """A fresh data plane among all actors (at start, and after every failure: a
        failed batch leaves messages in flight that nobody will read)."""
        S = self.num_stages
        self.device_peers = [[] for _ in range(S)]
        if self.local:
            plane = LocalPlane([stage_name(i) for i in range(S)])
            for i, w in enumerate(self.workers):
                w._obj.plane = plane.endpoint(i)
            return
        addr, port = self._get(self.workers[0].plane_host.remote(), "data plane")
        self.device_peers = self._get([w.plane_open.remote(addr, port, S, self.timeout)
                                       for w in self.workers], "data plane")

    def close(self) -> None:
        """Kill the actors this executor spawned, free the placement group, and shut down
        Ray if this executor started it."""
        if self.local:
            self.workers = []
            return
        import ray

        if not ray.is_initialized():
            return
        # An embedded Ray's shutdown ends its actors and their group with it, and its
        # GCS may be ending already (a SIGTERM to the whole process group), when a call
        # to it would wait 60 s; a cluster's GCS that stopped answering took them along
        if not self._owns_ray and session.gcs_answers():
            for i, w in enumerate(self.workers):
                if i in self._owned:
                    try:
                        ray.kill(w)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
            if self._placer is not None:
                self._placer.close()
        self.workers, self._owned = [], set()
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

    def _get(self, refs, what: str):
        return refs if self.local else session.get(refs, self.timeout, what)

    def _settle(self, refs) -> None:
        """Wait until every call of `refs` has ended, failed or not (at most
        runtime.timeout_s): `_get` raises at the first failure, while the others go on."""
        if not self.local:
            session.count_ready(refs, self.timeout, lambda n: None)

    # ------------------------------------------------------------------ one call per actor
    def _wire_in(self, x, y, step: int, mbs: list[int], n: int, detail: str,
                 size: int | None = None) -> tuple[dict, dict]:
        """The driver's messages for micro-batches `mbs` of step `step`: the inputs, per
        first actor, and the targets for the last.  The batch is cut into len(mbs) equal
        chunks (as the in-process engine cuts it), or into pieces of `size`."""
        xs, ys = (x.chunk(len(mbs)), y.chunk(len(mbs))) if size is None else \
            (x.split(size), y.split(size))
        last = self.num_stages - 1
        inputs = {s: {(step, m): list(self._send(ACTIVATION, xm, stage_name(s), step, m, detail))
                      for m, xm in zip(mbs, xs)} for s in self.first}
        tdetail = "eval" if detail == "eval" else "train"
        targets = {(step, m): list(self._send(TARGET, ym, stage_name(last), step, m, tdetail,
                                              meta={"batch": n})) for m, ym in zip(mbs, ys)}
        return inputs, targets

    def _send(self, kind, tensor, dst, step, mb, detail, meta=None) -> tuple:
        msg = Message.make(kind, tensor, src=DRIVER, dst=dst, step=step, mb=mb, run=self.run_id,
                           detail=detail, meta=meta)
        self._ledger.record(DRIVER, dst, kind, msg.header_bytes, msg.payload_bytes)
        return msg.wire()

    def _issue(self, acts: list[list], inputs: dict, targets: dict, batches: int = 0) -> list:
        """Each actor's list for this batch, one call each (carrying `batches` training
        batches).  Local: run them here."""
        last = self.num_stages - 1
        if self.local:
            ws = [w._obj for w in self.workers]
            gens = [interpret(w, acts[s], inputs.get(s, {}), targets if s == last else {})
                    for s, w in enumerate(ws)]
            try:
                return drive_all(gens, [w.plane for w in ws])
            except BaseException:
                self._recover()
                raise
        self.calls += self.num_stages
        if batches:
            self.calls_trained += self.num_stages
            self.calls_batches += batches
        return [w.run.remote(acts[s], inputs.get(s), targets if s == last else None)
                for s, w in enumerate(self.workers)]

    def _gather(self, refs: list, what: str) -> list:
        if self.local:
            return refs
        try:
            # a silent peer is the plane's error (naming the edge) first: wait longer
            return session.gather(refs, self.timeout * 1.5 + 10, what, self._cause_order)
        except BaseException as err:
            if not isinstance(err, KeyboardInterrupt):
                self._forget_echoes()
            self._recover()
            raise

    def _stats_of(self, raws) -> StepStats:
        st = StepStats(0.0, 0, 0)
        for raw in raws:
            d = self._stats(raw)
            st.loss_sum += d["loss_sum"]
            st.correct += d["correct"]
            st.samples += d["samples"]
        return st

    # ------------------------------------------------------------------ schedules
    def _schedule(self, name: str, M: int):
        key = (name, M)
        if key not in self._schedules:
            graph = None if self.placement.is_chain else self.graph
            opts = self._sched_options if name == self.schedule_name else {}
            self._schedules[key] = make_schedule(name, self.num_stages, M, graph, **opts)
        return self._schedules[key]

    def _plan(self, M: int):
        """Dry-run every schedule this executor may run (its own, and its flushing
        counterpart for measuring passes), so a deadlock is found before any actor exists."""
        for name in {self.schedule_name, self.flush_name}:
            for dfa in {self.broadcast_output_error, False}:
                simulate(self._schedule(name, M), 1.0, 1.0, dfa=dfa)
        return self._schedule(self.schedule_name, M)

    # ------------------------------------------------------------------ training
    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, wd: float,
                   upcoming: tuple | None = None) -> StepStats:
        """upcoming: (x, y, lr, wd) of the very next train_step, when nothing reads or
        changes the model in between: a flushing schedule trains it in this step's calls,
        right behind this batch (`runtime.batches_per_call`); async issues it now, behind
        this batch (stream.py).  Its own train_step then returns its stats.  Reading the
        model in between (state, probes) finds its update already made."""
        self._check_upcoming(self._step + 1, x, y, lr, wd)
        self._step += 1
        self._ch_samples += int(x.shape[0])
        st = self._train_recovering(x, y, self._step, float(lr), float(wd), upcoming)
        self._replay.remember(x, y, self._step, float(lr), float(wd))
        return st

    def _train(self, x, y, step: int, lr: float, wd: float, upcoming=None) -> StepStats:
        if self.streamed:
            return self._run_async(x, y, step, lr, wd, upcoming)
        ahead, self._ahead = self._ahead, None
        if ahead is not None:  # trained in the calls of the step before (`_run`'s then)
            return self._stats_of(ahead.reply)
        then = upcoming if self.cfg.runtime.batches_per_call > 1 else None
        return self._run(x, y, step, {"lr": lr, "wd": wd}, then=then)

    _train_recovering = recovering(_train)  # a recovery's own replay calls _train

    @recovering
    def flush(self) -> None:
        """Wait until every issued step has finished (async: drain the stream).  An actor
        lost in a batch's tail is recovered as in a step: the replay includes that batch."""
        self._drain()

    @keeps_traffic
    @recovering
    def evaluate(self, loader) -> tuple[float, float]:
        """Loss and accuracy through the same actors, forward only: one call per actor
        per batch, a few batches in flight.  Each batch goes through in micro-batches of
        training's size: an actor keeps the largest buffers it ever held (alloc.py), and
        a whole evaluation batch (`train.eval_batch_size`) per message would grow every
        actor by that batch's activations, many times training's own."""
        return self._evaluate(loader)

    def _evaluate(self, loader) -> tuple[float, float]:
        self._drain()
        self._broadcast("mode", train=False)
        loss, correct, n, pending = 0.0, 0, 0, []

        def collect(refs):
            nonlocal loss, correct, n
            st = self._stats_of(self._gather(refs, f"evaluation at step {self._step}")[-1])
            loss, correct, n = loss + st.loss_sum, correct + st.correct, n + st.samples

        try:
            size, first = self.cfg.train.micro_batch_size, 0
            for x, y in loader:
                b = int(x.shape[0])
                mbs = list(range(first, first + -(-b // size)))  # x.split(size)'s pieces
                first += len(mbs)
                inputs, targets = self._wire_in(x, y, self._step, mbs, b, "eval", size)
                acts = [("I", self._step, m) for m in mbs]
                pending.append(self._issue([acts] * self.num_stages, inputs, targets))
                if len(pending) > 2:
                    collect(pending.pop(0))
            while pending:
                collect(pending.pop(0))
        finally:
            self._broadcast("mode", train=True)
        return loss / max(n, 1), correct / max(n, 1)

