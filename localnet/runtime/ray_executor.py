"""`RayExecutor`: the in-process executor's interface, one Ray actor per pipeline stage.

    ex = RayExecutor(cfg, input_shape, num_classes)      # or runtime.executor: ray in a config
    stats = ex.train_step(x, y, lr, wd)                   # -> engine.StepStats
    ex.evaluate(loader); ex.alignment(); ex.mirror_steps(n); ex.state_dict()
    ex.ledger_summary(); ex.runtime_info(); ex.close()

The driver never touches a tensor in flight.  It interprets the schedule (gpipe / 1f1b,
`schedule.py`): for every action, in an order the simulator proved deadlock-free, it
issues an actor call whose arguments are the ObjectRefs returned by the producing call,
so activations and errors go actor to actor through Ray's object store.  Each actor runs
its calls in submission order, which is exactly its schedule list.  DFA: the last stage's
forward returns e, and that one object is handed to every stage's backward.

A failure anywhere (a bad message, NaN in an error) propagates through the ObjectRefs:
the step's STEP calls depend on every backward, so no stage updates its weights, and the
driver re-raises the original `MessageError` naming edge, kind and step.
"""

from __future__ import annotations

import os
import uuid
from collections import deque

import torch

from ..engine import StepStats
from ..rules import make_rule
from ..builders import as_config, build_rule_and_model
from .cost import measure_unit_costs
from .ledger import Ledger
from .messages import ACTIVATION, CONTROL, TARGET, Control, Message, MessageError
from .partition import groups, resolve_partition
from .schedule import make_schedule, simulate
from .worker import DRIVER, StageWorker, stage_name


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
        ray.init(num_cpus=runtime.local_cpus, include_dashboard=False)
    return True


class RayExecutor:
    name = "ray"

    def __init__(self, cfg, input_shape, num_classes: int, *, model=None, actors=None,
                 audit: bool = False, run_id: str | None = None, local: bool = False):
        """cfg: a Config (runtime section: schedule, partition, resources, address).
        model: the driver's copy, only read for its structure (built when omitted).
        actors: existing StageWorker actor handles to reuse (at least one per stage);
        the executor then neither spawns nor kills actors.  audit: workers keep a copy of
        every message they receive (`audit_log()`), for tests.  local: no Ray at all --
        plain StageWorker objects in this process, driven by the same schedule interpreter
        (for debugging and fast tests)."""
        self.cfg = cfg = as_config(cfg)
        rt = cfg.runtime
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)
        self.micro_batches = cfg.train.micro_batches
        self.timeout = rt.timeout_s
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.audit = audit
        self.local = local
        self._owns_ray = False
        self._owns_actors = actors is None
        self._pg = None
        self.workers = []

        if model is None:
            _, model = build_rule_and_model(cfg, self.input_shape, self.num_classes)
        units = list(model.units)
        self.unit_names = list(model.unit_names)
        params = [sum(p.numel() for p in u.parameters()) for u in units]

        def costs():
            f, b = measure_unit_costs(cfg, self.input_shape, self.num_classes, threads=rt.threads)
            return [x + y for x, y in zip(f, b)]

        self.boundaries = resolve_partition(rt.partition, len(units), params, costs)
        self.groups = groups(self.boundaries, len(units))
        S = self.num_stages = len(self.groups)
        self.dfa = not make_rule(cfg.rule.name, **cfg.rule.options()).sends_error
        self._schedules: dict[int, tuple] = {}
        self._plan(self.micro_batches)  # raises DeadlockError before any actor exists

        try:
            self._owns_ray = False if local else ensure_ray(rt)
            if local:
                self.workers = [_Local(StageWorker(threads=0)) for _ in range(S)]
            elif actors is None:
                self.workers = self._spawn(S)
            else:
                if len(actors) < S:
                    raise ValueError(f"{len(actors)} actors given for {S} stages")
                self.workers = list(actors[:S])
            specs = [{"config": cfg.model_dump(mode="json"), "index": i, "num_stages": S,
                      "units": list(g), "input_shape": list(self.input_shape),
                      "num_classes": self.num_classes, "run": self.run_id, "audit": audit,
                      "threads": 0 if local else rt.threads} for i, g in enumerate(self.groups)]
            self.stage_info = self._get([w.setup.remote(s) for w, s in zip(self.workers, specs)],
                                        "setup")
        except BaseException:
            self.close()
            raise
        self._step = 0
        self._ledger = Ledger()          # what the driver sends
        self._audit: list[dict] = []     # what the driver receives (audit mode)

    # ------------------------------------------------------------------ actors
    def _spawn(self, S: int):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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
        remote = ray.remote(num_cpus=rt.num_cpus, num_gpus=rt.num_gpus)(StageWorker)
        return [remote.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=i)).remote(threads=rt.threads)
                for i in range(S)]

    def close(self) -> None:
        """Kill the actors this executor spawned, free the placement group, and shut down
        Ray if this executor started it."""
        if self.local:
            self.workers = []
            return
        import ray

        if not ray.is_initialized():
            return
        if self._owns_actors:
            for w in self.workers:
                try:
                    ray.kill(w)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.workers = []
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
        ws, self.workers, self._owns_actors = self.workers, [], False
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

    def _plan(self, M: int):
        if M not in self._schedules:
            sched = make_schedule(self.cfg.runtime.schedule, self.num_stages, M)
            self._schedules[M] = (sched, simulate(sched, 1.0, 1.0, dfa=self.dfa).order())
        return self._schedules[M]

    def _recover(self) -> None:
        """After a failed step: clear every stage's in-flight state (best effort)."""
        try:
            self._get([w.reset.remote() for w in self.workers], "reset")
        except Exception:  # noqa: BLE001 - the original error is what matters
            pass

    # ------------------------------------------------------------------ training
    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, wd: float) -> StepStats:
        self._step += 1
        return self._run(x, y, self._step, step_args={"lr": float(lr), "wd": float(wd)})

    def _run(self, x, y, step: int, step_args: dict | None, dfa: bool | None = None) -> StepStats:
        """Issue one batch's schedule; STEP actions only when step_args is given."""
        dfa = self.dfa if dfa is None else dfa
        S, n = self.num_stages, x.shape[0]
        xs, ys = x.chunk(self.micro_batches), y.chunk(self.micro_batches)
        M = len(xs)
        sched, order = self._plan(M)
        if dfa != self.dfa:
            order = simulate(sched, 1.0, 1.0, dfa=dfa).order()
        last = S - 1
        acts, errs, e_refs, stats, firsts = {}, {}, {}, {}, [[] for _ in range(S)]
        done = []
        for s, a in order:
            w, mb = self.workers[s], a.mb
            if a.op == "F":
                if s == 0:
                    inp = self._send(ACTIVATION, xs[mb], stage_name(0), step, mb, "input")
                else:
                    inp = acts.pop((s - 1, mb))
                if s < last:
                    acts[(s, mb)] = w.forward.options(num_returns=2).remote(*inp)
                    continue
                tgt = self._send(TARGET, ys[mb], stage_name(last), step, mb, "train",
                                 meta={"batch": n})
                if dfa and S > 1:
                    r = w.forward.options(num_returns=3).remote(*inp, *tgt)
                    stats[mb], e_refs[mb] = r[0], (r[1], r[2])
                else:
                    stats[mb] = w.forward.remote(*inp, *tgt)
            elif a.op == "B":
                sends = s > 0 and not dfa  # returns the chain error (hdr, payload)
                call = w.backward.options(num_returns=2 if sends else 1)
                if s == last:
                    r = call.remote(mb, dep=stats[mb])
                elif dfa:
                    r = call.remote(mb, None, None, *e_refs[mb])
                else:
                    r = call.remote(mb, *errs.pop((s + 1, mb)))
                if sends:
                    errs[(s, mb)] = r
                    firsts[s].append(r[0])
                else:
                    firsts[s].append(r)
            elif step_args is not None:  # STEP: waits on (and aborts with) every backward
                done.append(w.control.remote(self._control("step", s, step, **step_args),
                                             *firsts[s]))
            else:
                done.extend(firsts[s])
        try:
            out = self._get([stats[m] for m in range(M)] + done, f"step {step}")
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

    def forward_backward(self, x, y, stats: StepStats) -> None:
        """Forward and backward of one batch, gradients left in the stages (no step)."""
        st = self._run(x, y, self._step + 1, None)
        stats.loss_sum += st.loss_sum
        stats.correct += st.correct
        stats.samples += st.samples

    def bp_update_angles(self, x, y) -> dict[str, float]:
        """As InProcessExecutor.bp_update_angles: angle between each layer's update under
        its rule and the BP gradient on the same batch; BatchNorm statistics restored."""
        from ..alignment import update_angles

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
        return update_angles(grads[0], grads[1])

    def evaluate(self, loader) -> tuple[float, float]:
        """Loss and accuracy through the same actors, forward only, a few batches in
        flight at a time."""
        self._broadcast("mode", train=False)
        S, last = self.num_stages, self.num_stages - 1
        loss, correct, n = 0.0, 0, 0
        pending: deque = deque()

        def collect():
            nonlocal loss, correct, n
            d = self._stats(self._get(pending.popleft(), f"evaluation at step {self._step}"))
            loss, correct, n = loss + d["loss_sum"], correct + d["correct"], n + d["samples"]

        try:
            for i, (x, y) in enumerate(loader):
                h = self._send(ACTIVATION, x, stage_name(0), self._step, i, "eval")
                for s in range(last):
                    h = self.workers[s].infer.options(num_returns=2).remote(*h)
                t = self._send(TARGET, y, stage_name(last), self._step, i, "eval")
                pending.append(self.workers[last].infer.remote(*h, *t))
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
            self._broadcast("mirror", n=int(n))

    # ------------------------------------------------------------------ metrics and state
    def alignment(self) -> dict:
        out = {}
        for d in self._get([w.alignment.remote() for w in self.workers], "alignment"):
            out.update(d)
        return out

    def state_dict(self) -> dict:
        return {"stages": self._get([w.state_dict.remote() for w in self.workers], "state_dict"),
                "executor": self.name, "boundaries": list(self.boundaries), "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        stages = state["stages"]
        if len(stages) != self.num_stages or state.get("boundaries", self.boundaries) != self.boundaries:
            raise ValueError(f"checkpoint has {len(stages)} stages (boundaries "
                             f"{state.get('boundaries')}); this runtime has {self.num_stages} "
                             f"(boundaries {self.boundaries}): use the same runtime.partition")
        self._get([w.load_state_dict.remote(st) for w, st in zip(self.workers, stages)],
                  "load_state_dict")
        self._step = int(state.get("step", self._step))

    def model_state_dict(self) -> dict:
        """The full model's state dict ("units.<i>...."), gathered from the stages."""
        out = {}
        for d in self._get([w.unit_state.remote() for w in self.workers], "unit_state"):
            out.update(d)
        return out

    def stage_timings(self, clear: bool = True) -> list[dict]:
        """Per stage, `StageWorker.timings()`: call times since the last call (metrics)."""
        return self._get([w.timings.remote(clear) for w in self.workers], "timings")

    def ledger(self) -> Ledger:
        led = Ledger().merge(self._ledger)
        for d in self._get([w.ledger.remote() for w in self.workers], "ledger"):
            led.merge(Ledger.from_dict(d))
        return led

    def ledger_summary(self) -> dict:
        return self.ledger().as_summary()

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

    def runtime_info(self) -> dict:
        sched, _ = self._plan(self.micro_batches)
        sim = simulate(sched, 1.0, 1.0, dfa=self.dfa)
        return {"executor": self.name, "schedule": sched.name, "stages": self.num_stages,
                "micro_batches": self.micro_batches, "boundaries": list(self.boundaries),
                "units": [[self.unit_names[i] for i in range(a, b)] for a, b in self.groups],
                "dfa_broadcast": self.dfa, "placement": self.cfg.runtime.placement,
                "bubble_fraction_equal_costs": sim.bubble_fraction,
                "ray_address": None if self.local else _ray_address(),
                "actors": self.stage_info, "run_id": self.run_id, "step": self._step}


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
