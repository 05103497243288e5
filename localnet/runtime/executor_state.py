"""The coordinator's whole-model operations: commands to every actor, state and
checkpoints, measuring passes, and what it reports.  None of them is on the per-batch
path (`ray_executor.py`); each first drains an async stream."""

from __future__ import annotations

import functools
import time

from ..errors import ConfigError
from ..engine import StepStats
from . import checkpoint
from .graph import Placement
from ..ledger import Ledger
from .messages import CONTROL, Control, MessageError
from ..schedules import simulate, stream_staleness
from .messages import DRIVER, stage_name


def recovering(method):
    """A coordinator call that outlives actors' deaths: when actors died (a lost node),
    recover them (`_revive`: recreate, restore the checkpoint, replay) and call again."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        while True:
            try:
                return method(self, *args, **kwargs)
            except MessageError:
                raise
            except Exception as err:  # noqa: BLE001 - an actor may have died
                if not self._revive(err):
                    raise
    return call


def keeps_traffic(method):
    """A coordinator call whose messages no recovery sends again (an evaluation, a
    measuring pass, mirror steps): its traffic is set apart, so that it stays counted
    when a recovery takes the ledger back to the checkpoint's (`_rewind_ledgers`)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        self.flush()  # an async stream's training traffic is not this call's
        self._kept_from = self.ledger()  # (a recovery inside moves it past its replay)
        try:
            out = method(self, *args, **kwargs)
        except BaseException:  # the call's own error is the one to report
            self._kept_from = None
            raise
        self._kept.merge(self.ledger().minus(self._kept_from))
        self._kept_from = None
        return out
    return call


class StateMixin:
    # ------------------------------------------------------------------ commands
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

    def train(self, mode: bool) -> None:
        self._broadcast("mode", train=bool(mode))

    @keeps_traffic
    def mirror_steps(self, n: int) -> None:
        if n:
            self._drain()
            self._broadcast("mirror", n=int(n))
            if self._ckpt is None:
                self._pre_mirror += int(n)

    # ------------------------------------------------------------------ measuring passes
    def _channels(self, on: bool) -> None:
        """Measuring passes bypass the channels (as in-process): no codec state, drop
        draws or delay slots are spent on them."""
        if self.channels and self._ch_now != on:
            self._drain()
            self._get([w.set_channels.remote(on) for w in self.workers], "channels")
            self._ch_now = on

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

    @keeps_traffic
    @recovering
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
                self._run(x, y, self._step + 1, None)
                g = {}
                for d in self._get([w.weight_grads.remote() for w in self.workers], "probe"):
                    g.update(d)
                grads.append(g)
        finally:
            self._get([w.probe_end.remote() for w in self.workers], "probe")
            self._channels(True)
        return update_angles(grads[0], grads[1])

    # ------------------------------------------------------------------ state
    @recovering
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
            raise ConfigError(f"--resume: the checkpoint has {n} stage"
                              f"{'s' * (n != 1)} (boundaries {state.get('boundaries')}); "
                              f"this run's runtime.partition makes {self.num_stages} "
                              f"(boundaries {self.boundaries}): resume with the executor "
                              f"and runtime.partition that wrote it")

    def load_state_dict(self, state: dict) -> None:
        stages = state["stages"]
        self._check_layout(state, len(stages))
        self._drain()
        self._get([w.load_state_dict.remote(st) for w, st in zip(self.workers, stages)],
                  "load_state_dict")
        self._step = int(state.get("step", self._step))
        self._replay.clear()
        self._ckpt_ledger, self._kept = self.ledger(), Ledger()

    @recovering
    def save_state(self, run_dir) -> dict:
        """Checkpoint: every actor writes its own state (checkpoint.py).  Returns the small
        record train.py keeps in checkpoint.pt; the actors' files never pass through the
        driver."""
        self._drain()
        # the traffic of every step so far, which a recovery to this checkpoint restores:
        # read before the actors write, as nothing is sent while they do
        ledger = self.ledger()
        gen, manifest = checkpoint.save(self, run_dir)
        # the checkpoint holds every step so far: from here on, a recovery goes back to it
        # with nothing to replay -- so they all change together, before any other call
        self._ckpt, self._ckpt_step = gen, self._step
        self._replay.clear()
        self._ckpt_ledger, self._kept = ledger, Ledger()
        return {"executor": self.name, "checkpoint": f"{checkpoint.CHECKPOINT_DIR}/{gen.name}",
                "step": self._step, "bytes": manifest["bytes"], **self._layout(),
                "recoveries": list(self.recoveries),  # a resumed run's summary lists them all
                "channel_samples": self._ch_samples}  # what the links' counts cover

    def load_saved_state(self, run_dir, saved: dict) -> None:
        """Resume from what `save_state` returned: each actor loads its own file."""
        if "stages" in saved:  # gathered on the driver (state_dict), or re-cut (recut.py)
            self.load_state_dict(saved)
            self.recoveries = list(saved.get("recoveries", self.recoveries))
            return
        gen, manifest = checkpoint.read_manifest(run_dir, saved)
        self._check_layout(manifest, len(manifest["actors"]))
        self._drain()
        self._get([w.load_checkpoint.remote(str(gen)) for w in self.workers], "resume")
        self._step = int(manifest["step"])
        self._ckpt, self._ckpt_step = gen, self._step
        self._replay.clear()
        self._ckpt_ledger, self._kept = self.ledger(), Ledger()
        self.recoveries = list(saved.get("recoveries", []))
        self._ch_samples = int(saved.get("channel_samples", 0))

    def stage_members(self) -> list[tuple]:
        """What each actor holds, ("units", a, b) or ("node", layer), as recut.py names it."""
        return self.placement.stage_members()

    def model_state_dict(self) -> dict:
        """The full model's state dict ("units.<i>...."), gathered from the stages."""
        self._drain()
        out = {}
        for d in self._get([w.unit_state.remote() for w in self.workers], "unit_state"):
            out.update(d)
        return out

    # ------------------------------------------------------------------ observability
    def record_spans(self, first: int, last: int) -> None:
        """Every actor notes when its training actions of steps first..last-1 run (a
        recovery asks again of every actor: the replay notes them afresh)."""
        self._span_window = (first, last)
        self._get([w.record_spans.remote(first, last) for w in self.workers], "record_spans")

    def spans(self) -> list[list]:
        """Per actor, the actions it noted (`StageWorker.spans`), once."""
        self._span_window = None
        return self._get([w.spans.remote() for w in self.workers], "spans")

    def _device_edges(self) -> list[str]:
        """Edges whose payloads stay on the device: `device_peers[s]`, what the plane
        told actor s when it opened (the coordinator's `_open_plane`)."""
        return [f"{stage_name(p)}->{stage_name(c)}" for p, c in self.placement.edges()
                if c in self.device_peers[p]]

    def crowding(self) -> tuple[int, int] | None:
        """(actors computing on CPU, the cores of the machines they run on), when there
        are more such actors than cores: each message then costs CPU that the
        computation waits for (README, "How fast, on few cores").  Ray nodes started on
        one machine share its cores, so cores are counted per host."""
        cpu = [i for i in self.stage_info if str(i.get("device", "cpu")) == "cpu"]
        cores = {i["host"]: i["host_cores"] for i in cpu if i.get("host_cores")}
        if self.local or not cpu or not cores or len(cpu) <= sum(cores.values()):
            return None
        return len(cpu), sum(cores.values())

    def gpu_sharing(self) -> tuple[int, int] | None:
        """(actors computing on GPUs, how many GPUs they are on), when some share one:
        each actor is a process with its own CUDA context that launches every kernel
        of its layers itself and hands activations over through host memory, so one
        GPU time-shared by several does far less than one process capturing the whole
        step as a CUDA graph (README, "On a GPU")."""
        gpus = [i.get("gpu") for i in self.stage_info if i.get("gpu")]
        if self.local or len(gpus) <= len(set(gpus)):
            return None
        return len(gpus), len(set(gpus))

    def cpu_policy_fallback(self) -> list[str] | None:
        """The policies the CPU actors run, when some could not take runtime.cpu_policy
        (rr where the kernel refuses real-time scheduling, or with several torch threads:
        cpu_policy.py); None when every one runs it, and in local mode (the driver's
        threads are left alone).  GPU actors run batch by design (`for_actor`)."""
        got = sorted({str(i["cpu_policy"]) for i in self.stage_info
                      if i.get("cpu_policy") and str(i.get("device", "cpu")) == "cpu"})
        if self.local or not got or got == [self.cfg.runtime.cpu_policy]:
            return None
        return got

    def starting_at_once(self) -> int | None:
        """The most actors that were starting at one moment (from loading localnet to
        the end of setup: `import torch`, building their parts), which
        runtime.start_window bounds.  None in local mode (one process)."""
        spans = [(i["loaded_at"], i["ready_at"]) for i in self.stage_info]
        if self.local or not spans:
            return None
        return max(sum(a <= t < b for a, b in spans) for t, _ in spans)

    def _cross_node_edges(self) -> list[str]:
        nodes = [i.get("ray_node") for i in self.stage_info]
        return [f"{stage_name(p)}->{stage_name(c)}" for p, c in self.placement.edges()
                if nodes[p] and nodes[c] and nodes[p] != nodes[c]]

    def ledger_summary(self) -> dict:
        return self.ledger().run_summary()

    def reset_ledger(self) -> None:
        """Count from zero (a benchmark's warm-up done); a later recovery counts the steps
        it replays from here too."""
        self._ledger.clear()
        self._ckpt_ledger, self._kept = Ledger(), Ledger()
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
        """Test hook: stage `stage` corrupts (or, mode "silent", never sends) its next
        outgoing `kind` message."""
        self._get(self.workers[stage].inject_fault.remote(kind, mode, step, mb), "inject_fault")

    def staleness(self) -> list[int]:
        """Per actor: how many updates its forward of a micro-batch may be missing
        (0: gpipe / 1f1b).  async: d(s), the edges on the longest path from the actor to
        the last one -- at most the pipeline depth minus one."""
        if not self.streamed:
            return [0] * self.num_stages
        return stream_staleness(self.graph, self.num_stages)

    def runtime_info(self) -> dict:
        from .session import ray_address

        sched = self._schedule(self.schedule_name, self.micro_batches)
        sim = simulate(sched, 1.0, 1.0, dfa=self.broadcast_output_error)
        stale = self.staleness()
        pl = self.placement
        device_edges = self._device_edges()
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
                "dfa_broadcast": self.broadcast_output_error, "placement": self.cfg.runtime.placement,
                "num_cpus": self.cfg.runtime.num_cpus, "num_gpus": self.cfg.runtime.num_gpus,
                "devices": sorted({i.get("device", "cpu") for i in self.stage_info}),
                # the actors' threads' scheduling policy (runtime.cpu_policy); local: the
                # driver's own, which the runtime leaves alone
                "cpu_policies": sorted({i.get("cpu_policy", "?") for i in self.stage_info}),
                # the actors' malloc (runtime.allocator); local: the driver's own
                "allocators": sorted({i.get("allocator", "?") for i in self.stage_info}),
                "data_plane": "local queues" if self.local else (
                    "torch.distributed gloo" + ("; NCCL between GPUs" if device_edges else "")),
                # edges whose payloads stay on the device (two actors on different GPUs)
                "device_edges": device_edges,
                # training calls per training batch: one per actor, or half that when each
                # call carries two batches (runtime.batches_per_call)
                "driver_calls_per_batch": (round(self.calls_trained / self.calls_batches, 2)
                                           if self.calls_batches else self.num_stages),
                "driver_calls": self.calls,
                "startup_s": self.startup_s,
                # where the actors' main threads spent their CPU over the run, and the
                # coordinator's process since its actors were ready (data, calls, metrics)
                "actor_cpu_s": self.actor_cpu_s(),
                "coordinator_cpu_s": time.process_time() - self._cpu0,
                "startup_phases_s": self.startup_phases,
                # per actor, the CPU its process had used when set up: Ray's worker,
                # `import torch`, building its units
                "actor_startup_cpu_s": [i.get("process_cpu_s") for i in self.stage_info],
                # seconds from each actor's process loading localnet to its setup's end
                # (`import torch` and building its part), and how many actors started
                # at once at most (runtime.start_window)
                "actor_startup_s": [round(i["ready_at"] - i["loaded_at"], 2)
                                    for i in self.stage_info],
                "actors_starting_at_once": self.starting_at_once(),
                "memory_estimate": self.memory,
                "bubble_fraction_equal_costs": sim.bubble_fraction,
                "ray_address": None if self.local else ray_address(),
                "actor_nodes": [i.get("ray_node") for i in self.stage_info],
                # edges whose two actors sit on different Ray nodes: their messages go
                # between machines (gloo over TCP, as every edge; there is no shortcut)
                "cross_node_edges": self._cross_node_edges(),
                # (CPU actors, their machines' cores) when the actors outnumber the cores
                "crowding": self.crowding(),
                "gpu_sharing": self.gpu_sharing(),  # (GPU actors, GPUs) when some share
                "actor_info": self.stage_info, "run_id": self.run_id, "step": self._step,
                "checkpoint": str(self._ckpt) if self._ckpt else None,
                "recoveries": list(self.recoveries)}

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
        # in the actors' order: each kind's links input to output, as in-process (a
        # plot of fidelity by link colours them by depth)
        sends = [d for p in parts for d in p["send"]]
        n = self._ch_samples
        for d in sends:
            r = recv.get((d["kind"], d["edge"]), {})
            row = {**d, "delivered": r.get("delivered", 0),
                   "not_yet_arrived": r.get("not_yet_arrived", 0),
                   "bytes_per_sample": d["bytes"] / n if n else 0.0}
            kinds[row.pop("kind")].append(row)
        return summarize(kinds["activation"], kinds["error"], n, self.broadcast_output_error)
