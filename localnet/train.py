"""The training loop and the run directory.

A run directory holds:
  config.yaml     the resolved config
  metrics.jsonl   one line per epoch: loss, accuracy, lr, wd, per-layer alignment
  steps.jsonl     every `metrics.alignment_every` steps: loss and per-layer alignment
  checkpoint.pt   written atomically at the end of every epoch (and every
                  runtime.checkpoint_every steps); the Ray runtime's actors each write
                  checkpoint/step-<N>/<actor>.pt themselves, next to a manifest, and
                  checkpoint.pt only records where (localnet/runtime/README.md)
  summary.json    the headline numbers (see `Summary`)
  stopped.json    why a run that had started ended before its summary: diverged,
                  interrupted or failed, after which step, and the message (removed
                  when the run goes on: --resume)
  messages.json   Ray executor: messages and bytes per edge and kind (localnet/ledger.py)
  timeline.json   Ray executor: when each actor ran each action over a few steps
                  (localnet/timeline.py; `localnet report` draws it)

With `metrics.port` set, the run also serves its metrics in the Prometheus format
(localnet/metrics.py, deploy/README.md).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import platform
import signal
import time
from pathlib import Path

import torch

from .alloc import keep_freed_memory
from .config import Config, ConfigError, dump_config
from .errors import DivergedError
from .data import load_data
from .builders import build_rule_and_model, optim_config
from .channels.channel import FidelityWindow
from .engine import InProcessExecutor
from .schedules import SCHEDULES
from .files import first_few, load_state, lock_holder, run_lock, save_state, write_json, write_text
from .metrics import RunObserver
from .timeline import Timeline
from .progress import StartupStatus, TrainProgress
from .resume import (STOPPED, finished_summary, keep_recorded, logged_train_loss,
                     refuse_nothing_to_train, restore, saved_cuts)
from .timing import cpu_kind, cpu_since, machine_cpu_s
from .watchdog import SIGTERM_SEEN


class NonFiniteLossError(DivergedError):
    """The run diverged at `step`; the message says where, and how to go on."""

    def __init__(self, msg: str, step: int):
        super().__init__(msg)
        self.step = step

    def __reduce__(self):  # a sweep point's worker process sends it back
        return (type(self), (str(self), self.step))


def _delivered(links: dict | None) -> str:
    """The above-chance note's sentence on what each error link delivered this epoch."""
    if not links:
        return ""
    each = "; ".join(f"{edge} cos {f['cos']:.2f}, rest {f['rest']:.2f}"
                     + (f" (noise {f['noise']:g})" if f.get("noise") else "")
                     for edge, f in links.items())
    note = (f"  This epoch's error links, input to output, delivered: {each} (rest: what "
            f"arrived besides each message's own direction, over its size).")
    # a link's noise r is a rest of about r by itself, orthogonal to the codec's: what
    # is left is the codec's, which a finer one would spend bits on
    codec_rest = [math.sqrt(max(f["rest"] ** 2 - (f.get("noise") or 0.0) ** 2, 0.0))
                  for f in links.values()]
    if max(codec_rest) >= 0.5:  # (fp32 links: nothing to spend on)
        note += ("  A rest near 1 or more on one link can blow a rule up where a finer "
                 "codec on that link alone (channel.edges) keeps it stable; "
                 "localnet/channels/README.md, \"What error feedback keeps\".")
    noisy = [edge for edge, f in links.items() if (f.get("noise") or 0.0) >= 0.5]
    if noisy:
        # FA's blow-up under noise followed lr x r on MNIST: half the rate bore twice
        # the noise (localnet/channels/README.md)
        note += (f"  The noise set on {', '.join(noisy)} is a rest of its size by itself "
                 f"(channel: noise); with fixed feedback (fa, dfa) the rate times the noise "
                 f"is what counts, so half the rate bears twice the noise.")
    return note


def _links_with_noise(fidelity: dict | None, links: dict | None) -> dict | None:
    """An epoch's error-link fidelity ({edge: {"cos", "rest", ...}}), each link with the
    noise it was set to (its channel summary's), for the above-chance note."""
    if not fidelity:
        return fidelity
    errors = (links or {}).get("error") or {}
    return {edge: {**f, "noise": (errors.get(edge) or {}).get("noise") or 0.0}
            for edge, f in fidelity.items()}


class _LossTrail:
    """The losses a divergence message quotes, so a user can tell whether the last
    checkpoint is worth going on from.  Step k's loss is computed on the weights that
    step k-1 left, so a checkpoint saved at step s is judged by the loss of step s+1."""

    FLAT, BAND = 20, 0.02  # steps, and how close to ln C their losses are

    def __init__(self, saved: int | None):
        self.saved, self.on_saved = saved, None  # the last checkpoint's step; its loss
        self.first = self.last = None  # (step, loss) of this process's first and last steps
        self.recent = collections.deque(maxlen=self.FLAT)

    def step(self, step: int, loss: float) -> None:
        self.first = self.first or (step, loss)
        self.last = (step, loss)
        self.recent.append(loss)
        if self.saved == step - 1:
            self.on_saved = loss

    def constant_output(self, num_classes: int, cfg: Config) -> str | None:
        """A note when the last FLAT steps' losses all sit at ln C: the cross-entropy of an
        output that no longer depends on the input (a deep ResNet at 0.1 from its first
        step ends there, and stays).  Nothing stops: the accuracy would say it only as
        chance, after the whole run."""
        chance = math.log(num_classes)
        if len(self.recent) < self.FLAT or any(abs(x - chance) >= self.BAND
                                                for x in self.recent):
            return None
        return (f"note: the training loss has stayed within {self.BAND} of ln {num_classes} = "
                f"{chance:.3f} for the last {self.FLAT} steps: the loss of an output that "
                f"ignores its input.  A deep network at too high a rate from its first step "
                f"ends there and stays, as does one whose weights the decay took to zero; "
                f"start again with the rate ramped up "
                f"(train.lr_warmup_steps is {cfg.train.lr_warmup_steps}) or lowered "
                f"(train.lr is {cfg.train.lr:g}); README, \"Models\"")

    @staticmethod
    def above_chance(last: dict, num_classes: int, epoch: int, cfg: Config,
                     links: dict | None = None) -> tuple[dict, str] | None:
        """A record and a note when an epoch's mean training loss or its test loss is above
        ln C while the same images' accuracy is at least twice chance's.  An output that
        ignores its input scores ln C; one that classifies most images right and still
        scores worse gets its wrong ones wrong with huge logits: its weights have grown
        past what the rate keeps stable, or what a restricted error lets them keep.  Where
        an error link's codec biases what arrives (topk without error feedback blows FA
        and DFA up at every rate tried), the note names it and the option that mends it.
        The loss stays finite, so nothing stops, and the accuracy alone reads as a rule
        that learns a little worse.  `links`, the epoch's error links' fidelity ({edge:
        {"cos", "rest", ...}}, input to output), goes into the note: which link delivered
        what is where to spend bits (FA's one-bit errors blew it up through the last
        link alone, at a rest near the message's own size)."""
        chance = math.log(num_classes)
        for where in ("train", "test"):
            loss, acc = last[f"{where}_loss"], last[f"{where}_accuracy"]
            if loss > chance and acc >= 2 / num_classes:
                record = {"epoch": epoch + 1, "on": where, "loss": round(loss, 4),
                          "accuracy": round(acc, 4), "chance_loss": round(chance, 4)}
                biases = "".join(f"  Here {b}." for b in cfg.channel.error_biases())
                return record, (
                    f"note: epoch {epoch + 1}'s {where} loss, {loss:.4g}, is above ln "
                    f"{num_classes} = {chance:.3f} (the loss of an output that ignores its "
                    f"input), while {acc:.1%} of those images were classified right: the "
                    f"logits have grown huge.  A rate past the largest at which the rule "
                    f"trains stably does this (train.lr is {cfg.train.lr:g}; try a lower "
                    f"one), and so can an error channel that no lower rate mends; README, "
                    f"\"Models\".{biases}{_delivered(links)}")
        return None

    def diverged(self, what: str, step: int, epoch: int, cfg: Config,
                 run_dir: Path) -> NonFiniteLossError:
        lr = cfg.train.lr
        msg = f"training diverged at step {step} (epoch {epoch + 1} of {cfg.train.epochs}): {what}"
        if self.first and self.last != self.first:
            msg += f" (the loss: {self.first[1]:.4g} at step {self.first[0]}, " \
                   f"{self.last[1]:.4g} at step {self.last[0]})"
        again = f"start again at a smaller rate, for example --set train.lr={lr / 10:g} " \
                f"(train.lr is {lr:g})"
        if self.saved is None:
            if not cfg.train.lr_warmup_steps:  # early on, the usual cure for a deep net
                again += (f", or ramp the rate up past this step: --set "
                          f"train.lr_warmup_steps={max(100, 2 * step)}")
            return NonFiniteLossError(f"{msg}.  No checkpoint was saved before it: {again}.", step)
        if self.saved >= step - 1:  # its weights are the ones that gave NaN
            return NonFiniteLossError(f"{msg}.  The last checkpoint (step {self.saved}) holds "
                                      f"the weights that diverged: {again}.", step)
        on = f" (the loss on its weights: {self.on_saved:.4g})" if self.on_saved is not None else ""
        return NonFiniteLossError(
            f"{msg}.  The last checkpoint is from step {self.saved}{on}.  To go on from it "
            f"at a smaller rate (train.lr is {lr:g}): localnet run --resume {run_dir} "
            f"--set train.lr={lr / 10:g}", step)


def lr_at(cfg: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """The rate of an optimizer step: the schedule's, times the warm-up's ramp.  A function
    of the step alone, so a resumed run (and every actor) gets the same rates."""
    t = cfg.train
    if t.lr_schedule == "milestones":
        lr = t.lr * t.lr_gamma ** sum(epoch >= m for m in t.lr_milestones)
    elif t.lr_schedule == "cosine":
        progress = (epoch + step_in_epoch / max(steps_per_epoch, 1)) / t.epochs
        lr = 0.5 * t.lr * (1 + math.cos(math.pi * min(progress, 1.0)))
    else:
        lr = t.lr
    step = epoch * steps_per_epoch + step_in_epoch
    if step < t.lr_warmup_steps:
        lr *= (step + 1) / t.lr_warmup_steps
    return lr


def wd_at(cfg: Config, epoch: int) -> float:
    """Weight decay from the milestone table ({epoch: wd}), else the base value."""
    wd = cfg.train.weight_decay
    for e in sorted(cfg.train.wd_milestones):
        if epoch >= e:
            wd = cfg.train.wd_milestones[e]
    return wd


def train_device(cfg: Config) -> torch.device:
    """train.device for the in-process executor (the Ray runtime: runtime.num_gpus)."""
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda, but torch sees no GPU here (torch "
                         f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}); "
                         "use train.device=cpu or auto")
    return torch.device(want)


def _channel_cuts(cfg: Config, data, model) -> list[int]:
    """Where the in-process executor's channels sit: between the actors that
    `runtime.partition` would make (a chain of unit groups), so a run gives the same
    numbers in-process as on Ray."""
    from .runtime.cost import unit_costs
    from .runtime.partition import resolve_placement

    part = cfg.runtime.partition
    if part == "per_layer":
        raise ConfigError("channel with runtime.partition: per_layer puts a channel on every "
                          "edge of the layer graph, which only the actors model: use "
                          "runtime.executor: local (the same actors in this process) or ray")
    return resolve_placement(part, model, unit_costs(cfg, data.input_shape,
                                                     data.num_classes)).boundaries


def process_threads(cfg: Config) -> int | None:
    """This process's torch threads: train.threads, else 1 for a Ray run's coordinator,
    else torch's choice (None).  The coordinator only cuts batches, on the cores its
    actors compute on, and a team of torch threads there spins at each op's barrier
    while an actor holds the other cores (benchmarks/RESULTS.md, "the coordinator's
    torch threads")."""
    return cfg.train.threads or (1 if cfg.runtime.executor == "ray" else None)


def build(cfg: Config, on_phase=None):
    """Data, rule, model and executor for a config.  on_phase: told what start-up is
    doing (the Ray runtime's actors take a while to start)."""
    keep_freed_memory()  # training reallocates the same big buffers every step (alloc.py)
    threads = process_threads(cfg)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    d = cfg.data
    data = load_data(d.name, root=d.root, subset=d.subset, test_subset=d.test_subset,
                     augment=d.augment, download=d.download, seed=cfg.seed,
                     image_size=d.image_size)
    rule, model = build_rule_and_model(cfg, data.input_shape, data.num_classes)
    optim = optim_config(cfg)
    if cfg.runtime.executor in ("ray", "local"):  # one actor per stage (local: no Ray, same
        from .runtime.ray_executor import RayExecutor  # workers); the model only gives the layout
        executor = RayExecutor(cfg, data.input_shape, data.num_classes, model=model,
                               local=cfg.runtime.executor == "local", on_phase=on_phase)
    else:
        ch = cfg.channel  # localnet/channels: only when restricted (else bit-identical as before)
        executor = InProcessExecutor(model, optim, micro_batches=cfg.train.micro_batches,
                                     device=train_device(cfg), cuda_graph=cfg.train.cuda_graph,
                                     **({"channels": ch, "channel_seed": cfg.seed,
                                         "boundaries": _channel_cuts(cfg, data, model)}
                                        if ch.active() else {}))
    return data, rule, model, executor


def new_run_dir(cfg: Config, out: str | None) -> Path:
    if out:
        path = Path(out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.out_dir) / f"{cfg.run_name()}-{stamp}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot make the run directory {path} ({err.strerror or err}); "
                      f"{'--out' if out else 'out_dir'} names where it goes") from None
    return path


def train(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True,
          on_interrupt=None, position: dict | None = None) -> dict:
    """Train per `cfg`, writing into run_dir; returns the summary dict.  on_interrupt(exc)
    is told of a Ctrl-C or SIGTERM once the stop is recorded, before the executor closes.
    position: kept at {"step": the last step trained, "saved": the checkpoint's step}, for
    record_signal_stop from another thread."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # read before taking the lock, which rewrites the file: a lock file whose holder is
    # gone means the process before this one was killed outright (files.lock_holder)
    before = lock_holder(run_dir) if resume else None
    with run_lock(run_dir):  # before the checkpoint is read: another run may be writing it
        return _held(cfg, run_dir, resume, progress, on_interrupt,
                     killed=before if before and before["alive"] is False else None,
                     position={} if position is None else position)


def _held(cfg: Config, run_dir: Path, resume: bool, progress: bool, on_interrupt,
          killed: dict | None, position: dict) -> dict:
    ckpt = None
    if resume:  # read (and refuse) the checkpoint before anything in run_dir is written
        if not (run_dir / "checkpoint.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint.pt in {run_dir}: the run stopped "
                                    f"before its first one, so there is nothing to resume; "
                                    f"start a new run (localnet run CONFIG)")
        ckpt = load_state(run_dir / "checkpoint.pt")
        done = finished_summary(run_dir, ckpt, cfg)
        if done is not None:  # a retried command: the run is final, leave it as it is
            return done
        refuse_nothing_to_train(run_dir, ckpt, cfg)
    threads = torch.get_num_threads()  # build() sets this process's (train.threads)
    try:
        with StartupStatus(enabled=progress) as status:
            data, rule, model, ex = build(saved_cuts(cfg, ckpt), on_phase=status.phase)
        try:
            # only once the data and the actors are there: a run that cannot start leaves its
            # new directory empty (the CLI removes it).  A resumed run's config.yaml is
            # rewritten once its checkpoint has loaded.
            if not resume:
                write_text(run_dir / "config.yaml", dump_config(cfg))
            return _train(cfg, run_dir, ckpt, progress, data, rule, ex, model, killed, position)
        except KeyboardInterrupt as exc:
            # said first: after a SIGTERM to the whole process group, Ray's own processes are
            # going too, and closing the actors can take seconds or end this process
            if on_interrupt is not None:
                on_interrupt(exc)
            raise
        finally:
            ex.close()  # the Ray runtime's actors (and Ray, if the executor started it)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process gets its own back


def _identity(path: Path) -> tuple | None:
    """Which file `path` is now: a replaced file is another inode (atomic_write writes
    the new one beside the old, so the two are alive at once and cannot share one)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _record_stop(run_dir: Path, exc: BaseException, step: int, saved: int | None) -> None:
    """Why a run that had started training ended before its summary, for `localnet
    report` and whoever reads the directory later (a night's runs on a cluster)."""
    how = ("diverged" if isinstance(exc, DivergedError) else
           "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
    if isinstance(exc, NonFiniteLossError):  # the step that gave NaN does not count
        step = exc.step - 1
    try:
        _write_stop(run_dir, exc, how, step, saved)
    except KeyboardInterrupt as signalled:
        # a SIGTERM to the whole process group also ends Ray's processes: a Ray call
        # that failed for that may bring the run here just before the signal's own
        # handler runs, which then raises in the middle of the write.  The signal is
        # what stopped the run: record that, and stop as it says.
        _write_stop(run_dir, signalled, "interrupted", step, saved)
        raise


def record_signal_stop(run_dir: Path, signum: int, position: dict) -> None:
    """stopped.json for a run whose main thread has not recorded its stop `grace` seconds
    after the signal (localnet/watchdog.py): stuck in a Ray call that waits for Ray's
    processes, which the same signal to the process group ended.  The process may be
    ended before that thread gets out, and the run's record would be missing."""
    if (run_dir / STOPPED).exists() or "step" not in position:
        return  # recorded already, or no step trained: nothing to record beside the line
    _write_stop(run_dir, KeyboardInterrupt("SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"),
                "interrupted", position["step"], position.get("saved"))


def _write_stop(run_dir: Path, exc: BaseException, how: str, step: int,
                saved: int | None) -> None:
    with contextlib.suppress(OSError):  # a full disk: the error being raised says more
        write_json(run_dir / STOPPED, {
            "how": how, "after_step": step, "checkpoint_step": saved,
            "error": type(exc).__name__,
            "message": str(exc) or (type(exc).__name__ if not isinstance(exc, KeyboardInterrupt)
                                    else "SIGTERM" if SIGTERM_SEEN.is_set() else "Ctrl-C"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def _tell_recoveries(bar, ex, told: int, obs=None) -> int:
    """A line for each actor death the runtime recovered from since the last call (Ray's
    own report of the death says nothing of what localnet did about it), and its count
    on the metrics endpoint."""
    recs = getattr(ex, "recoveries", ())
    for r in recs[told:]:
        if obs is not None:
            obs.recovered(r)
        n = r["replayed_steps"]
        bar.note(f"recovered: {', '.join(r['dead'])} died at step {r['at_step']}; every actor "
                 f"went back to the checkpoint of step {r['restored_step']} and replayed {n} "
                 f"step{'s' * (n != 1)} in {r['seconds']:.1f} s ({r['lost_steps']} lost)")
    return len(recs)


def _channel_summary(ex) -> dict | None:
    """What the run's channels carried and how much of it arrived (the executor's links'
    counts); None without channels."""
    return ex.channel_summary() if getattr(ex, "channel_summary", None) else None


def _records(cfg: Config, step: int) -> bool:
    """Whether the step after `step` records alignment (and probes before it)."""
    return bool(cfg.metrics.alignment_every) and step % cfg.metrics.alignment_every == 0


def _straight_on(cfg: Config, done: int, total: int, record: bool) -> bool:
    """Whether step `done` + 1 follows step `done` with nothing reading or saving the
    model in between (no alignment record after `done`, no probe before the next, no
    checkpoint), so the runtime may issue it early (`train_step(upcoming=)`)."""
    every = cfg.runtime.checkpoint_every
    return (done < total and not record and not (every and done % every == 0)
            and not (_records(cfg, done) and cfg.metrics.bp_angle))


def _train(cfg: Config, run_dir: Path, ckpt: dict | None, progress: bool, data, rule, ex,
           model, killed: dict | None, position: dict) -> dict:
    t = cfg.train
    resume = ckpt is not None
    ckpt_path = run_dir / "checkpoint.pt"
    start_epoch, step, train_time, samples_seen, recuts, changes = 0, 0, 0.0, 0, [], []
    skip, sums = 0, (0.0, 0, 0)  # a mid-epoch checkpoint: batches done, their loss/correct/seen
    if resume:
        at = restore(ex, model, cfg, run_dir, ckpt)
        start_epoch, step, skip, sums = at.epoch, at.step, at.skip, at.sums
        train_time, samples_seen, recuts = at.train_time, at.samples, at.recuts
        changes = at.changes
    else:
        for f in ("metrics.jsonl", "steps.jsonl", STOPPED):  # a sweep point run afresh
            (run_dir / f).unlink(missing_ok=True)
        rule.on_start(ex)
    step0, own_s = step, 0.0  # this process's training: what its CPU account covers

    # a GPU in this process: batches come in pinned memory, one asynchronous copy each
    pin = isinstance(ex, InProcessExecutor) and ex.device.type == "cuda"
    test_loader = data.test_loader(t.eval_batch_size, pin_memory=pin)
    steps_per_epoch = len(data.train) // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size: {t.batch_size} is more than the "
                          f"{len(data.train)} training samples"
                          + (f" (data.subset: {cfg.data.subset})" if cfg.data.subset else ""))
    total_steps = min(t.epochs * steps_per_epoch, t.max_steps or 10**18)
    obs = RunObserver(cfg, run_dir, ex, resume=resume, total_steps=total_steps, step=step,
                      epoch=start_epoch, saved_messages=(ckpt or {}).get("messages"))
    # (obs: the Prometheus endpoint, metrics.port; messages.json)
    timeline = Timeline(cfg, ex, run_dir, step, total_steps)  # timeline.json
    metrics_f = open(run_dir / "metrics.jsonl", "a")
    steps_f = open(run_dir / "steps.jsonl", "a")
    last = {"train_loss": float("nan"), "test_loss": float("nan"), "test_accuracy": float("nan")}
    epochs_done = start_epoch
    wall_start = time.perf_counter()
    # the machine's cores over this process's training (its epochs' timed spans): how
    # busy the run kept them, and how much went to the kernel's copies
    machine: dict[str, float] = {}
    bar = TrainProgress(total_steps, enabled=progress, initial=step)

    def finish(at: int, epoch: int, call, *args):
        """call(*args), for a step or a flush.  A NaN or inf between actors (an error or
        activation) ends the run as a diverged loss does.  The runtime checks the first
        actors' part of a batch while the next one runs, so the message names its step
        (`at`: the step to blame when it does not)."""
        try:
            return call(*args)
        except DivergedError as err:
            where = getattr(err, "step", None)
            where = where if isinstance(where, int) and 0 < where <= at else at
            raise trail.diverged(err.what, where, epoch, cfg, run_dir) from None

    def save(epoch, step, train_time, samples, **mid_epoch):
        """checkpoint.pt; the executor saves its state (Ray: each actor to its own file)."""
        state = {"executor": ex.save_state(run_dir), "messages": obs.messages.state(),
                 "epoch": epoch, "step": step,
                 "train_time": train_time, "samples": samples, **mid_epoch,
                 "torch_rng": torch.get_rng_state(), "config": cfg.model_dump(mode="json"),
                 "recuts": recuts, "changes": changes}
        before = _identity(ckpt_path)
        try:
            save_state(state, ckpt_path)
        finally:
            # a Ctrl-C or SIGTERM is raised at the next bytecode, which can come after the
            # new file has replaced the old: then the checkpoint on disk is this step's,
            # and stopped.json and the stop line must say so
            if _identity(ckpt_path) != before:
                trail.saved = position["saved"] = step
    trail = _LossTrail(step if resume else None)
    position.update(step=step, saved=trail.saved)  # from here on, a stop is recorded
    if obs.url:
        bar.note(f"metrics: {obs.url}")
    if resume:
        bar.note((f"resumed at step {step} of {total_steps} (epoch {start_epoch + 1} of "
                  f"{t.epochs}), from the last checkpoint" if step < total_steps else
                  f"resumed at its last step ({step}), from the last checkpoint: nothing "
                  f"is left to train; evaluating for the summary")
                 + (f"; the process before (pid {killed['pid']}, since {killed['since']}) "
                    f"was killed outright, so the steps it took after that checkpoint are "
                    f"trained again" if killed else ""))
    if resume and at.changed:
        changed = at.changed
        bar.note("resumed with other settings: " + first_few(
            [f"{k} {a} -> {b}" for k, (a, b) in changed.items()])
            + "; config.yaml now holds them, summary.json also what came before")
    if resume and at.recut:
        bar.note(f"resumed: the checkpoint's {recuts[-1]['from']} re-cut into this run's "
                 f"{recuts[-1]['to']}; checkpoint.pt now holds the new cut")
    if isinstance(ex, InProcessExecutor) and SCHEDULES.get(cfg.runtime.schedule.name).streamed:
        # no error: async actors against this synchronous reference is a comparison
        # users make (benchmarks/pipeline.py), and an async run may be resumed here
        bar.note(f"note: runtime.schedule {cfg.runtime.schedule.name} updates each actor per "
                 f"micro-batch, stale by the pipeline's depth; the in-process executor "
                 f"has no pipeline, so it trains one update per batch (the maths of gpipe "
                 f"and 1f1b).  runtime.executor=local runs {cfg.runtime.schedule.name} in "
                 f"this process")
    crowded = ex.crowding()
    if crowded:
        bar.note(f"note: {crowded[0]} actors share {crowded[1]} CPU cores, so each message "
                 f"costs CPU that the computation waits for.  Fewer, larger actors run "
                 f"faster: --set 'runtime.partition={{stages: {crowded[1]}, balance: cost}}' "
                 f"(README, \"How fast, on few cores\")")
    shared = ex.gpu_sharing()
    if shared:
        bar.note(f"note: {shared[0]} actors share {shared[1]} GPU{'s' * (shared[1] > 1)}, each "
                 f"launching its own layers' kernels through its own CUDA context.  On "
                 f"one GPU, one process that captures the whole step as a CUDA graph "
                 f"runs faster: --set runtime.executor=inprocess (README, \"On a GPU\")")
    fallback = ex.cpu_policy_fallback()
    if fallback:
        if cfg.runtime.threads > 1:
            why = ("runtime.threads > 1: OpenMP's idle workers spin, and a spinning "
                   "real-time thread would keep its core from the other actors")
        else:
            why = ("the kernel refused real-time scheduling (it needs root, CAP_SYS_NICE "
                   "or `ulimit -r` of at least 1)")
        bar.note(f"note: the actors run cpu_policy {', '.join(fallback)}, not "
                 f"{cfg.runtime.cpu_policy}: {why}.  On few cores that costs some speed "
                 f"(localnet/runtime/README.md, \"Who gets the core\")")
    told = len(getattr(ex, "recoveries", ()))  # the ones a resumed checkpoint lists
    links = _channel_summary(ex)
    # each epoch's record says what arrived of its own messages (the summary: the run's)
    fidelity = FidelityWindow(links) if links is not None else None
    flat_at = None  # the step after which the constant-output note came (once a process)
    blown, blown_noted = None, False  # the last epoch's losses above ln C; its note (once)
    try:
        for epoch in range(start_epoch, t.epochs):
            if step >= total_steps:
                break
            loss_sum, correct, seen = sums if epoch == start_epoch else (0.0, 0, 0)
            seen0 = seen  # a resumed epoch's samples before the resume: not timed here
            wd = wd_at(cfg, epoch)
            tic, cpu0 = time.perf_counter(), machine_cpu_s()
            loader = data.train_loader(t.batch_size, cfg.seed, epoch, pin_memory=pin)
            # (skipped: done before the mid-epoch checkpoint we resumed from)
            todo = ((i, b) for i, b in enumerate(loader) if epoch != start_epoch or i >= skip)
            # each batch with the one after it (None last): the loop looks one ahead
            for (i, (x, y)), then in itertools.pairwise(itertools.chain(todo, [None])):
                if step >= total_steps:
                    break
                lr = lr_at(cfg, epoch, i, steps_per_epoch)
                record = _records(cfg, step)
                angles = obs.untimed(ex.bp_update_angles, x, y) if (record and cfg.metrics.bp_angle) else None
                upcoming = None  # the next batch, if nothing reads the model before it
                if then is not None and _straight_on(cfg, step + 1, total_steps, record):
                    upcoming = (*then[1], lr_at(cfg, epoch, then[0], steps_per_epoch), wd)
                st = finish(step + 1, epoch, obs.timed_step, ex.train_step, x, y, lr, wd,
                            upcoming)
                step += 1
                position["step"] = step
                told = _tell_recoveries(bar, ex, told, obs)
                if not math.isfinite(st.loss_sum):
                    raise trail.diverged(f"the loss is {st.loss_sum}", step, epoch, cfg, run_dir)
                trail.step(step, st.loss_sum / st.samples)
                loss_sum, correct, seen = loss_sum + st.loss_sum, correct + st.correct, seen + st.samples
                if record:
                    line = {"step": step, "epoch": epoch, "loss": st.loss_sum / st.samples, "lr": lr,
                            "alignment": ex.alignment()}
                    if angles is not None:
                        line["bp_update_angle"] = angles
                    steps_f.write(json.dumps(line) + "\n")
                    steps_f.flush()
                    obs.record(line["alignment"], angles)
                sps = (seen - seen0) / (time.perf_counter() - tic)  # tic: this process's
                obs.step(step=step, epoch=epoch, lr=lr, wd=wd, batch_loss=st.loss_sum / st.samples,
                         loss_sum=loss_sum, correct=correct, seen=seen, samples=st.samples,
                         samples_per_s=sps)
                bar.update(loss=st.loss_sum / st.samples, acc=st.correct / st.samples,
                           samples_per_s=sps)
                every = cfg.runtime.checkpoint_every
                if every and step % every == 0 and step < total_steps:
                    finish(step, epoch, ex.flush)
                    timeline.flushed(step)
                    save(epoch, step, train_time + time.perf_counter() - tic, samples_seen,
                         batch=i + 1, epoch_sums=(loss_sum, correct, seen))
            finish(step, epoch, ex.flush)  # the last batch's tail is training time
            timeline.flushed(step)
            epoch_s = time.perf_counter() - tic
            train_time += epoch_s
            own_s += epoch_s
            for k, v in cpu_since(cpu0).items():
                machine[k] = machine.get(k, 0.0) + v
            samples_seen += seen
            obs.eval_begin()
            test_loss, test_acc = ex.evaluate(test_loader)
            last = {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                    "test_loss": test_loss, "test_accuracy": test_acc}
            # this epoch's own speed: a run's first epoch also pays for warming up (each
            # actor's first batches allocate and build its kernels), the later ones not
            line = {"epoch": epoch, "step": step, **last, "lr": lr_at(cfg, epoch, 0, steps_per_epoch),
                    "weight_decay": wd, "train_s": epoch_s,
                    "samples_per_s": (seen - seen0) / epoch_s if epoch_s > 0 else 0.0,
                    "alignment": ex.alignment()}
            links = _channel_summary(ex) if fidelity is not None else None
            if links is not None:
                line.update(fidelity.since(links))
            metrics_f.write(json.dumps(line) + "\n")
            metrics_f.flush()
            obs.epoch_end(line, samples_seen)
            bar.epoch_done(epoch, t.epochs, last, time.perf_counter() - tic)
            flat = None if flat_at else trail.constant_output(data.num_classes, cfg)
            if flat:
                bar.note(flat)
                flat_at = step
            huge = trail.above_chance(last, data.num_classes, epoch, cfg,
                                      _links_with_noise(line.get("fidelity", {}).get("error"), links))
            if huge and not blown_noted:
                bar.note(huge[1])
                blown_noted = True
            # the summary's record is the last epoch's: a run that blew up at a rate
            # that decayed later, and trained well after, reports as trained well
            blown = huge[0] if huge else None
            epochs_done = epoch + 1
            save(epoch, step, train_time, samples_seen)
    except BaseException as exc:
        try:
            _record_stop(run_dir, exc, step, trail.saved)
        finally:
            obs.close()
        raise
    finally:
        bar.close()
        metrics_f.close()
        steps_f.close()

    if epochs_done == start_epoch and step > 0 and not math.isfinite(last["test_accuracy"]):
        # resumed with nothing left to train (killed after its last checkpoint, before
        # its summary): the summary reports what the checkpoint holds
        last["test_loss"], last["test_accuracy"] = ex.evaluate(test_loader)
        last["train_loss"] = logged_train_loss(run_dir)
    alignment = ex.alignment()
    summary = {
        "rule": cfg.rule.name, "model": cfg.model.name, "dataset": cfg.data.name,
        "epochs": epochs_done, "steps": step,
        "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
        "train_loss": last["train_loss"],
        "samples_per_s": samples_seen / train_time if train_time else 0.0,
        "train_s": train_time,
        # (this process's epochs only: a resumed run's earlier ones are not in it)
        "machine_cpu_s": {k: round(v, 2) for k, v in machine.items()} or None,
        # what this process trained, which machine_cpu_s and the actors' CPU account
        # cover (samples_per_s and train_s count a resumed run's earlier processes too)
        "trained_here": {"steps": step - step0, "train_s": own_s},
        "wall_s": time.perf_counter() - wall_start,
        "alignment": {n: a["angle"] for n, a in alignment.items()},
        "norm_ratio": {n: a["norm_ratio"] for n, a in alignment.items()},
        "transports_weights": rule.transports_weights,
        "seed": cfg.seed, "torch": torch.__version__, "host": platform.node(),
        # this process's CPU (an in-process run's compute; a Ray run's actors may be on
        # other nodes): one command ends differently on two kinds, so a sweep says when
        # its runs mixed them
        "cpu": cpu_kind(),
        "runtime": {k: v for k, v in ex.runtime_info().items() if k != "actor_info"},
        # per kind count and bytes, parameter_bytes: the run's (a resumed one's earlier
        # processes too), as messages.json counts them
        "messages": (obs.messages.ledger().run_summary() if obs.messages.enabled
                     else ex.ledger_summary()),
    }
    links = _channel_summary(ex)
    if links is not None:
        summary["channels"] = links
    if recuts:  # resumed under other cuts of the model (recut.py)
        summary["recuts"] = recuts
    if changes:  # resumed under other settings: what the steps before each trained with
        summary["resumed_with"] = changes
    if flat_at:  # so a report of many runs (a sweep's) can say which ones
        summary["constant_output"] = {"after_step": flat_at,
                                      "loss": round(math.log(data.num_classes), 4)}
    if blown:  # so a sweep's table and a report can say which runs' logits grew huge
        summary["loss_above_chance"] = blown
    write_json(run_dir / "summary.json", keep_recorded(summary, run_dir / "summary.json"),
               indent=2)
    obs.close(linger=True)  # metrics.linger_s: let a scraper take the final values
    return summary
