"""Live metrics of a training run, in the Prometheus format; the observer that also keeps
the run's message log (`MessageLog`, ledger.py).

    obs = RunObserver(cfg, run_dir, executor, total_steps=..., step=..., epoch=...)
    st = obs.timed_step(ex.train_step, x, y, lr, wd)      # wall time of the step
    obs.step(...); obs.record(alignment, bp_angles)       # run gauges; per-layer gauges
    angles = obs.untimed(ex.bp_update_angles, x, y)        # measuring passes: not timed
    obs.eval_begin(); obs.epoch_end(...)                   # epoch values; messages.json
    obs.close(linger=True)                                 # final scrape, then shut down

`metrics.port` (null: no endpoint) and `metrics.address` (127.0.0.1) place the endpoint;
each run has its own CollectorRegistry, so runs (and tests) in one process never share
series.  Every series is named `localnet_*`; METRICS below is the full list, and
deploy/README.md documents it (a test keeps the two in step).

Per-actor times come from `StageTimer` (timing.py), which wraps a `Stage`'s forward /
backward / step.
In-process the driver reads it after every step.  On Ray each StageWorker holds one, and
every `metrics.poll_every` steps the driver asks for them, together with the message
ledger, and reads the answers at the next poll (`RayExecutor.ask_timings`), so that it
never waits for the actors between steps.  Wait (idle) time of a stage is the step's
wall time on the driver minus the stage's busy time in it; the bubble fraction is the
summed wait over (stages x wall time).

Without a ledger (the in-process executor) there is no message traffic to count.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .channels.channel import FIGURES
from .files import write_json
from .ledger import MessageLog
from .timing import OPS, StageTimer, cpu_parts

# ------------------------------------------------------------------ the metric list


@dataclass(frozen=True)
class MetricSpec:
    name: str      # as exposed (counters end in _total)
    type: str      # gauge | counter | histogram | info
    labels: tuple  # label names
    help: str


RUN, ACTOR, EDGE, LAYER = "run", "actor", "edge", "layer"

METRICS: list[tuple[str, MetricSpec]] = [
    (RUN, MetricSpec("localnet_run_info", "info", ("run", "rule", "model", "dataset", "executor"),
                     "constant 1; the run's name, rule, model, dataset and executor")),
    (RUN, MetricSpec("localnet_step", "gauge", (), "optimizer steps done")),
    (RUN, MetricSpec("localnet_total_steps", "gauge", (), "optimizer steps the run will take")),
    (RUN, MetricSpec("localnet_epoch", "gauge", (), "the epoch being trained (0-based)")),
    (RUN, MetricSpec("localnet_loss", "gauge", ("split",),
                     "split=train: mean loss over the epoch so far (the epoch's, once it "
                     "ends); split=test: at the last evaluation")),
    (RUN, MetricSpec("localnet_batch_loss", "gauge", (), "mean loss of the last step's batch")),
    (RUN, MetricSpec("localnet_accuracy", "gauge", ("split",),
                     "fraction correct; split=train: over the epoch so far; split=test: at "
                     "the last evaluation")),
    (RUN, MetricSpec("localnet_learning_rate", "gauge", (), "learning rate of the last step")),
    (RUN, MetricSpec("localnet_weight_decay", "gauge", (), "weight decay of the last step")),
    (RUN, MetricSpec("localnet_samples_per_second", "gauge", (),
                     "training samples per second over the epoch so far")),
    (RUN, MetricSpec("localnet_train_samples_total", "counter", (),
                     "training samples processed by this process")),
    (RUN, MetricSpec("localnet_recoveries_total", "counter", (),
                     "actor deaths the runtime recovered from in this process: the actors "
                     "recreated, every actor back to the last checkpoint")),
    (RUN, MetricSpec("localnet_recovery_steps_total", "counter", ("outcome",),
                     "steps recoveries went back over: outcome=replayed (trained again on "
                     "the same batches), outcome=lost (past the replay buffer)")),
    (RUN, MetricSpec("localnet_channel_cos", "gauge", ("kind",),
                     "with channels: the cosine between the messages the senders made and "
                     "what the receivers decoded, the last epoch's taken as one, per kind "
                     "(activation, error)")),
    (RUN, MetricSpec("localnet_channel_norm_ratio", "gauge", ("kind",),
                     "with channels: |decoded| / |sent| over the last epoch's messages "
                     "taken as one, per kind")),
    (RUN, MetricSpec("localnet_channel_rest", "gauge", ("kind",),
                     "with channels: what the receivers decoded besides the messages' own "
                     "direction, over the messages' size, the last epoch's taken as one, "
                     "per kind (norm ratio x sqrt(1 - cos^2))")),
    (RUN, MetricSpec("localnet_bubble_fraction", "gauge", (),
                     "idle share of the stages' time during training steps: summed wait over "
                     "(stages x step wall time), over the last poll window")),
    *[(ACTOR, MetricSpec(f"localnet_actor_{op}_seconds", "histogram", ("rank", "unit"), doc))
      for op, doc in (
          ("forward", "forward time of one micro-batch on a stage"),
          ("backward", "backward time of one micro-batch on a stage (error in, error out)"),
          ("update", "one optimizer step of a stage, its rule's after-step and mirror work "
                     "included"))],
    (ACTOR, MetricSpec("localnet_actor_wait_seconds", "histogram", ("rank", "unit"),
                       "idle time of a stage per training step: step wall time minus its "
                       "forward, backward and update time (on Ray: averaged over each poll "
                       "window)")),
    (ACTOR, MetricSpec("localnet_actor_samples_total", "counter", ("rank", "unit"),
                       "samples through a stage's training forward")),
    (ACTOR, MetricSpec("localnet_actor_cpu_seconds_total", "counter", ("rank", "unit", "part"),
                       "CPU seconds of a stage's main thread, by part: compute (forward, "
                       "backward, update); on Ray also plane (the data plane's send and "
                       "recv), interpreter (the rest of the batch calls: action lists, "
                       "messages made and checked) and calls (between the batch calls: "
                       "Ray's task machinery, other calls)")),
    (ACTOR, MetricSpec("localnet_actor_gpu_memory_bytes", "gauge", ("rank", "unit"),
                       "GPU memory allocated by torch in the stage's process (only with CUDA)")),
    (EDGE, MetricSpec("localnet_messages_total", "counter", ("src", "dst", "kind"),
                      "messages sent on an edge (driver, stage0, ...), per kind (activation, "
                      "error, target, control); from the runtime's ledger, a recovery's "
                      "replayed steps counted again")),
    (EDGE, MetricSpec("localnet_message_bytes_total", "counter", ("src", "dst", "kind"),
                      "header plus payload bytes sent on an edge, per kind")),
    (EDGE, MetricSpec("localnet_message_parameter_bytes_total", "counter", (),
                      "payload bytes that alias a parameter of the sender (0: no weight "
                      "transport)")),
    (EDGE, MetricSpec("localnet_link_cos", "gauge", ("kind", "link"),
                      "with channels: the cosine between the messages a link's sender made "
                      "and what its receiver decoded, the last epoch's taken as one; link: "
                      "the units it joins (\"layer1.2->layer2.0\")")),
    (EDGE, MetricSpec("localnet_link_norm_ratio", "gauge", ("kind", "link"),
                      "with channels: |decoded| / |sent| over a link's last epoch's messages "
                      "taken as one")),
    (EDGE, MetricSpec("localnet_link_rest", "gauge", ("kind", "link"),
                      "with channels: what a link's receiver decoded besides its messages' "
                      "own direction, over their size, the last epoch's taken as one")),
    (LAYER, MetricSpec("localnet_alignment_angle_degrees", "gauge", ("layer",),
                       "angle between W and the feedback matrix the rule sends errors through "
                       "(B; B_p R for PFA; W for BP)")),
    (LAYER, MetricSpec("localnet_feedback_norm_ratio", "gauge", ("layer",),
                       "||feedback|| / ||W||")),
    (LAYER, MetricSpec("localnet_bp_update_angle_degrees", "gauge", ("layer",),
                       "angle between the rule's update and the true BP gradient on the same "
                       "batch (only with metrics.bp_angle)")),
]

# 50 us .. 60 s: a tiny MLP's micro-batch to a ResNet-50 stage's
TIME_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

def _unit_label(names) -> str:
    names = list(names)
    if not names:
        return ""
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


class _Stages:
    """Reads per-stage timings off an executor: in-process (its Stage objects, timed
    here) or Ray (`stage_timings()`); no stages for an executor with neither."""

    def __init__(self, ex):
        self.ex = ex
        self.remote = hasattr(ex, "stage_timings")
        if self.remote:
            infos = getattr(ex, "stage_info", None) or []
            self.labels = [(str(i), _unit_label(info.get("unit_names", [])))
                           for i, info in enumerate(infos)]
            self.timers = None
        else:
            stages = getattr(ex, "stages", [])
            self.timers = [StageTimer(s) for s in stages]
            self.labels = [(str(i), _unit_label(s.names)) for i, s in enumerate(stages)]

    def take(self) -> list[dict]:
        if self.remote:
            return list(self.ex.stage_timings(True))
        return [t.take() for t in self.timers]


# ------------------------------------------------------------------ the registry


class _LedgerCollector:
    """Edge counters from the latest ledger snapshot.  They never go back, which
    Prometheus would read as a reset: when a recovery takes the ledger back to its
    checkpoint's counts (runtime/recovery.py), what it took back stays in `_gone`, so the
    counters go on counting what crossed the wire -- a replay's messages a second time,
    which messages.json counts once."""

    def __init__(self):
        self.rows: dict = {}
        self.parameter_bytes = 0
        self._last: dict = {}   # the latest snapshot's rows
        self._gone: dict = {}   # per row, what rewinds took back

    def update(self, ledger) -> None:
        for k in self._last.keys() | ledger.rows.keys():
            last, now = self._last.get(k, (0, 0, 0)), ledger.rows.get(k, (0, 0, 0))
            gone = self._gone.setdefault(k, [0, 0, 0])
            for i in range(3):
                gone[i] += max(last[i] - now[i], 0)
        self._last = {k: list(v) for k, v in ledger.rows.items()}
        self.rows = {k: [a + b for a, b in zip(self._last.get(k, (0, 0, 0)), g)]
                     for k, g in self._gone.items()}
        self.parameter_bytes = max(self.parameter_bytes, ledger.parameter_bytes)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        spec = {s.name: s for _, s in METRICS}
        msgs = CounterMetricFamily("localnet_messages", spec["localnet_messages_total"].help,
                                   labels=["src", "dst", "kind"])
        nbytes = CounterMetricFamily("localnet_message_bytes",
                                     spec["localnet_message_bytes_total"].help,
                                     labels=["src", "dst", "kind"])
        for (s, d, k), (c, h, p) in sorted(self.rows.items()):
            msgs.add_metric([s, d, k], c)
            nbytes.add_metric([s, d, k], h + p)
        pbytes = CounterMetricFamily("localnet_message_parameter_bytes",
                                     spec["localnet_message_parameter_bytes_total"].help,
                                     value=self.parameter_bytes)
        return [msgs, nbytes, pbytes]


class _ScrapeWatch:
    """Tells when a scrape that *started* after `arm()` has collected everything: its
    `first` collector is registered before every other one, `last` after them (a registry
    collects in registration order, one scrape per thread)."""

    def __init__(self):
        self.armed = False
        self.scraped = threading.Event()
        self.gap = None  # seconds between the last two scrapes: the scraper's interval
        self._last_at = None
        self._local = threading.local()
        watch = self

        class First:
            def collect(self):
                watch._local.armed = watch.armed
                return []

        class Last:
            def collect(self):
                now = time.monotonic()
                if watch._last_at is not None:
                    watch.gap = now - watch._last_at
                watch._last_at = now
                if getattr(watch._local, "armed", False):
                    watch.scraped.set()
                return []

        self.first, self.last = First(), Last()

    def arm(self) -> None:
        self.scraped.clear()
        self.armed = True


class Metrics:
    """The run's Prometheus series in a registry of their own, and the endpoint.
    Usable without an endpoint (`start()` not called): tests read `registry`."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = reg = CollectorRegistry()
        spec = {s.name: s for _, s in METRICS}
        self.watch = _ScrapeWatch()
        reg.register(self.watch.first)

        def make(name):
            s = spec[name]
            if s.type == "gauge":
                return Gauge(name, s.help, s.labels, registry=reg)
            if s.type == "counter":
                return Counter(name.removesuffix("_total"), s.help, s.labels, registry=reg)
            if s.type == "histogram":
                return Histogram(name, s.help, s.labels, registry=reg, buckets=TIME_BUCKETS)
            return Info(name.removesuffix("_info"), s.help, registry=reg)

        self.run_info = make("localnet_run_info")
        for name in ("step", "total_steps", "epoch", "loss", "batch_loss", "accuracy",
                     "learning_rate", "weight_decay", "samples_per_second", "bubble_fraction",
                     "alignment_angle_degrees", "feedback_norm_ratio",
                     "bp_update_angle_degrees", "actor_gpu_memory_bytes",
                     # each channel figure, per kind and per link (epoch_end sets them)
                     *(f"{scope}_{k}" for scope in ("channel", "link") for k in FIGURES)):
            setattr(self, name, make(f"localnet_{name}"))
        self.train_samples = make("localnet_train_samples_total")
        self.recoveries = make("localnet_recoveries_total")
        self.recovery_steps = make("localnet_recovery_steps_total")
        for outcome in ("replayed", "lost"):  # from the start: a rate needs the zero
            self.recovery_steps.labels(outcome)
        self.actor_samples = make("localnet_actor_samples_total")
        self.actor_cpu = make("localnet_actor_cpu_seconds_total")
        self.actor_time = {op: make(f"localnet_actor_{op}_seconds") for op in (*OPS, "wait")}
        self.ledger = _LedgerCollector()
        reg.register(self.ledger)
        reg.register(self.watch.last)
        self._server = None
        self.host, self.port, self.scheme = None, None, "http"

    # -- endpoint ------------------------------------------------------------------
    def start(self, port: int, address: str = "127.0.0.1", tls=None) -> str:
        """Serve /metrics; `tls` (config.MetricsTLS) switches to HTTPS, and with a client
        CA every scraper must present a certificate it signed."""
        from prometheus_client import start_http_server

        kw = {}
        if tls is not None and tls.enabled:
            kw = {"certfile": tls.certfile, "keyfile": tls.keyfile,
                  "client_cafile": tls.client_cafile,
                  "client_auth_required": tls.client_cafile is not None}
        self._server, _ = start_http_server(int(port), addr=address, registry=self.registry, **kw)
        self.host, self.port = address, int(self._server.server_port)
        self.scheme = "https" if kw else "http"
        return self.url

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/metrics"

    def wait_for_scrape(self, timeout: float) -> bool:
        """Block until the endpoint has served one more scrape (or timeout)."""
        if self._server is None or timeout <= 0:
            return False
        self.watch.arm()
        try:
            return self.watch.scraped.wait(timeout)
        finally:
            self.watch.armed = False

    # With one scrape in all (a run shorter than the scrape interval) the interval is not
    # known: 10 s is two of deploy/prometheus's 5-s intervals, and longer than the 5 s in
    # which Prometheus's discovery hands on a dropped target, after which none comes.
    QUIET_UNKNOWN_S = 10.0

    def wait_until_dropped(self, timeout: float) -> bool:
        """Keep answering until the scraper has stopped coming: two of its intervals (at
        least 1 s) pass with no scrape, or timeout.  Returns whether it went quiet."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            gap = self.watch.gap
            quiet = self.QUIET_UNKNOWN_S if gap is None else max(2 * gap, 1.0)
            if not self.wait_for_scrape(min(quiet, left)):
                return quiet < left
        return False

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def exposition(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    # -- observations --------------------------------------------------------------
    def alignment_values(self, alignment: dict, bp_angles: dict | None = None) -> None:
        for layer, a in alignment.items():
            self.alignment_angle_degrees.labels(layer).set(a["angle"])
            self.feedback_norm_ratio.labels(layer).set(a["norm_ratio"])
        for layer, deg in (bp_angles or {}).items():
            self.bp_update_angle_degrees.labels(layer).set(deg)

    def stage_values(self, labels, timings: list[dict], walls: list[float]) -> None:
        """timings: per stage, what StageTimer.take() returned over the steps whose driver
        wall times are `walls`."""
        wall, k = sum(walls), len(walls)
        waits = []
        for (rank, unit), t in zip(labels, timings):
            busy = 0.0
            for op in OPS:
                h = self.actor_time[op].labels(rank, unit)
                for d in t.get(op, ()):
                    h.observe(d)
                    busy += d
                # calls folded into sums between two polls (timing.KEEP) still count
                busy += (t.get("folded") or {}).get(op, {}).get("s", 0.0)
            if t.get("samples"):
                self.actor_samples.labels(rank, unit).inc(t["samples"])
            for part, v in cpu_parts(t).items():
                self.actor_cpu.labels(rank, unit, part).inc(v)
            if t.get("gpu_memory_bytes") is not None:
                self.actor_gpu_memory_bytes.labels(rank, unit).set(t["gpu_memory_bytes"])
            if k:
                wait = max(wall - busy, 0.0)
                waits.append(wait)
                h = self.actor_time["wait"].labels(rank, unit)
                for _ in range(k):
                    h.observe(wait / k)
        if k and waits and wall > 0:
            self.bubble_fraction.set(sum(waits) / (len(waits) * wall))


# ------------------------------------------------------------------ the trainer's view


class RunObserver:
    """Everything train() reports besides its jsonl files: the Prometheus series (when
    `metrics.port` is set) and messages.json (when the executor has a ledger)."""

    def __init__(self, cfg, run_dir, ex, *, resume: bool = False, total_steps: int = 0,
                 step: int = 0, epoch: int = 0, saved_messages: dict | None = None):
        m = cfg.metrics
        self.cfg, self.ex, self.run_dir = cfg, ex, Path(run_dir)
        self.messages = MessageLog(self.run_dir, ex, resume=resume, saved=saved_messages)
        self.metrics = None
        self.url = None
        self.sd_file = None
        if m.port is None:
            return
        self.metrics = Metrics()
        self.stages = _Stages(ex)
        self.poll_every = 1 if not self.stages.remote else m.poll_every
        self._walls: list[float] = []
        self._asked_walls: list[float] | None = None  # the window asked for, unread
        mt = self.metrics
        mt.run_info.info({"run": self.run_dir.name, "rule": cfg.rule.name,
                          "model": cfg.model.name, "dataset": cfg.data.name,
                          "executor": getattr(ex, "name", type(ex).__name__)})
        mt.total_steps.set(total_steps)
        mt.step.set(step)
        mt.epoch.set(epoch)
        from .config import ConfigError
        for key in ("certfile", "keyfile", "client_cafile"):
            f = getattr(m.tls, key)
            if f is not None and not Path(f).is_file():
                raise ConfigError(f"metrics.tls.{key}: no such file {f}")
        try:
            self.url = mt.start(m.port, m.address, m.tls)
        except ssl.SSLError as err:
            raise ConfigError(f"metrics.tls: cannot serve HTTPS with certfile={m.tls.certfile}, "
                              f"keyfile={m.tls.keyfile}, client_cafile={m.tls.client_cafile} "
                              f"({getattr(err, 'reason', None) or err})") from None
        except OSError as err:
            raise ConfigError(f"metrics.port={m.port}, metrics.address={m.address}: cannot "
                              f"serve metrics there ({err.strerror or err}); pick another "
                              f"port, or 0 for an ephemeral one") from None
        if m.insecure:
            sys.stderr.write(f"localnet: warning: metrics are served over plain HTTP on "
                             f"{m.address} (metrics.allow_insecure): anyone who can reach "
                             f"{self.url} can read them\n")
        if m.sd_dir:
            try:
                self._write_sd(Path(m.sd_dir))
            except OSError as err:  # a run announced nowhere would be scraped by no one
                self.metrics.stop()  # (it was up: its port is what the target names)
                raise ConfigError(f"metrics.sd_dir={m.sd_dir}: cannot write this run's "
                                  f"Prometheus target there ({err.strerror or err}); name a "
                                  f"writable folder that Prometheus reads") from None

    @property
    def enabled(self) -> bool:
        return self.metrics is not None

    def _write_sd(self, sd_dir: Path) -> None:
        host = self.metrics.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        sd_dir.mkdir(parents=True, exist_ok=True)
        self.sd_file = sd_dir / f"{self.run_dir.name}.json"
        labels = {"run": self.run_dir.name, "rule": self.cfg.rule.name}
        if self.metrics.scheme == "https":
            labels["__scheme__"] = "https"  # Prometheus then scrapes it with its tls_config
        doc = [{"targets": [f"{host}:{self.metrics.port}"], "labels": labels}]
        write_json(self.sd_file, doc, indent=None)

    # -- steps ---------------------------------------------------------------------
    def timed_step(self, fn, *args, **kwargs):
        """Run one training step (fn), timing it on the driver; collects stage timings
        every step in-process, every `metrics.poll_every` steps on Ray."""
        if not self.enabled:
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self._walls.append(time.perf_counter() - t0)
        if len(self._walls) >= self.poll_every:
            self.poll(wait=False)
        return out

    def untimed(self, fn, *args, **kwargs):
        """Run fn (extra measuring passes) without counting its stage time, its messages
        counted as probe_bytes."""
        self.messages.begin("probe")
        try:
            if not self.enabled:
                return fn(*args, **kwargs)
            self.poll()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stages.take()  # discard
        finally:
            self.messages.end("probe")

    def poll(self, wait: bool = True) -> None:
        """Stage timings since the last poll, and the ledger's edge counters.  Between
        training steps (wait=False) a Ray run's actors are asked now and their answers
        read at the next poll, so the metrics never drain the pipeline (runtime/polls.py)."""
        if not self.enabled:
            return
        if self._asked_walls is not None:  # the window asked for last time
            got, walls, self._asked_walls = self.ex.asked_timings(), self._asked_walls, None
            if got is not None:
                self.metrics.stage_values(self.stages.labels, got[0], walls)
                if self.messages.enabled:
                    self.metrics.ledger.update(got[1])
        if not wait and hasattr(self.ex, "ask_timings"):
            self.ex.ask_timings()
            self._asked_walls, self._walls = self._walls, []
            return
        timings = self.stages.take()
        self.metrics.stage_values(self.stages.labels, timings, self._walls)
        self._walls = []
        if self.messages.enabled:
            self.metrics.ledger.update(self.ex.ledger())

    def step(self, *, step: int, epoch: int, lr: float, wd: float, batch_loss: float,
             loss_sum: float, correct: int, seen: int, samples: int,
             samples_per_s: float) -> None:
        if not self.enabled:
            return
        mt = self.metrics
        mt.step.set(step)
        mt.epoch.set(epoch)
        mt.learning_rate.set(lr)
        mt.weight_decay.set(wd)
        mt.batch_loss.set(batch_loss)
        mt.train_samples.inc(samples)
        mt.samples_per_second.set(samples_per_s)
        if seen:
            mt.loss.labels("train").set(loss_sum / seen)
            mt.accuracy.labels("train").set(correct / seen)

    def recovered(self, rec: dict) -> None:
        """One recovery, as the runtime lists it (`runtime_info()["recoveries"]`)."""
        if self.enabled:
            self.metrics.recoveries.inc()
            self.metrics.recovery_steps.labels("replayed").inc(rec["replayed_steps"])
            self.metrics.recovery_steps.labels("lost").inc(rec["lost_steps"])

    def record(self, alignment: dict, bp_angles: dict | None = None) -> None:
        if self.enabled:
            self.metrics.alignment_values(alignment, bp_angles)

    # -- epochs --------------------------------------------------------------------
    def eval_begin(self) -> None:
        if self.enabled and (self._walls or self._asked_walls is not None):
            self.poll()
        self.messages.begin("eval")

    def epoch_end(self, line: dict, samples: int) -> None:
        """line: the epoch's metrics.jsonl record; samples: training samples so far."""
        cur, led = self.messages.fetch()
        self.messages.write(line["epoch"], line["step"], samples, led)
        if not self.enabled:
            return
        mt = self.metrics
        for split in ("train", "test"):
            if f"{split}_loss" in line:
                mt.loss.labels(split).set(line[f"{split}_loss"])
            if f"{split}_accuracy" in line:
                mt.accuracy.labels(split).set(line[f"{split}_accuracy"])
        mt.alignment_values(line.get("alignment", {}))
        for kind in ("activation", "error"):  # (kinds whose messages were measured)
            for k in FIGURES:
                if line.get(f"{kind}_{k}") is not None:
                    getattr(mt, f"channel_{k}").labels(kind).set(line[f"{kind}_{k}"])
            for link, f in (line.get("fidelity") or {}).get(kind, {}).items():
                for k in FIGURES:
                    if f.get(k) is not None:
                        getattr(mt, f"link_{k}").labels(kind, link).set(f[k])
        if cur is not None:
            mt.ledger.update(cur)  # this process's counts: counters restart with it

    # -- the end -------------------------------------------------------------------
    def close(self, linger: bool = False) -> None:
        """Shut the endpoint down; with linger, first wait (at most metrics.linger_s) for
        one more scrape so that a scraper has the final values."""
        if not self.enabled:
            return
        try:
            if linger and self.cfg.metrics.linger_s > 0:
                deadline = time.monotonic() + self.cfg.metrics.linger_s
                if self.metrics.wait_for_scrape(self.cfg.metrics.linger_s):
                    time.sleep(0.5)  # let the scraper receive and store the reply
                    if self.sd_file is not None:
                        # Prometheus drops a target seconds after its file goes (file SD
                        # is watched, and discovery sends updates at most every 5 s); a
                        # scrape meanwhile of a closed endpoint reads up == 0, a finished
                        # run taken for a dead one (LocalnetRunUnreachable, pending).  So
                        # take the announcement back first, and answer until it is dropped.
                        self._unannounce()
                        self.metrics.wait_until_dropped(deadline - time.monotonic())
        finally:
            self._unannounce()
            self.metrics.stop()

    def _unannounce(self) -> None:
        if self.sd_file is not None:
            self.sd_file.unlink(missing_ok=True)
            self.sd_file = None
