"""`--resume`: reading a run directory back, as the run left it.

A run that stopped (killed, failed, Ctrl-C, a lost cluster) goes on from its last
`checkpoint.pt`: the executor loads its state -- re-cut first when this run cuts the
model into other stages (recut.py) -- the trainer takes back its counters and RNG, and
what the stopped run logged past the checkpoint is dropped, so the run ends as an
uninterrupted one would.  A run that had finished is left as it is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import recut
from .config import Config, config_diff, dump_config, read_recorded
from .errors import ConfigError
from .engine import InProcessExecutor
from .files import counted, save_state, write_text

STOPPED = "stopped.json"


@dataclass
class Restored:
    """Where a resumed run picks up: the epoch, the step, batches of that epoch already
    done (a mid-epoch checkpoint) and their (loss sum, correct, seen), and the run's
    counters and re-cuts."""
    epoch: int
    step: int
    train_time: float
    samples: int
    skip: int = 0
    sums: tuple = (0.0, 0, 0)
    recuts: list = field(default_factory=list)
    recut: bool = False  # this resume re-cut the checkpoint
    # each resume under other settings: {"at_step", "settings": {key: [before, after]}}
    changes: list = field(default_factory=list)
    changed: dict = field(default_factory=dict)  # this resume's: {key: [before, after]}


def restore(ex, model, cfg: Config, run_dir: Path, ckpt: dict) -> Restored:
    """Load checkpoint.pt's state into `ex` and the trainer's RNG; rewrite config.yaml
    (only once the state loaded: a config it does not fit leaves the run as it was)."""
    try:
        recut_from = _load_checkpoint(ex, model, run_dir, ckpt)
    except RuntimeError as err:
        if "size mismatch" not in str(err) and "Missing key" not in str(err):
            raise
        raise RuntimeError(f"--resume: {run_dir / 'checkpoint.pt'} does not fit this config "
                           f"(did a --set change the model, the rule or its options?): "
                           f"{err}") from None
    recuts = list(ckpt.get("recuts", []))
    # config.yaml holds the settings the run goes on with; what it trained with before
    # stays on record here (and in summary.json)
    changes = list(ckpt.get("changes", []))
    diff = config_diff(_recorded(ckpt), cfg.model_dump(mode="json")) if "config" in ckpt else []
    if diff:
        changes.append({"at_step": ckpt["step"], "settings": {k: [a, b] for k, a, b in diff}})
    if recut_from is not None:
        recuts.append({"at_step": ckpt["step"], "from": recut.describe(recut_from),
                       "to": recut.describe(ex.stage_members())})
        # at once, in the new cut: what a later --resume, and a recovery from a lost
        # actor before the next checkpoint, go back to (the old cut's files stay)
        save_state({**ckpt, "executor": ex.save_state(run_dir), "recuts": recuts,
                    "changes": changes, "config": cfg.model_dump(mode="json")},
                   run_dir / "checkpoint.pt")
    write_text(run_dir / "config.yaml", dump_config(cfg))
    (run_dir / STOPPED).unlink(missing_ok=True)  # it goes on: the record would be stale
    # and so would the summary of an earlier finish (train.epochs raised): `localnet
    # report` would call the run done, with the old accuracy, while it trains on or after
    # it was killed; and the next --resume would take it for finished.  The run's next
    # end writes its own.
    (run_dir / "summary.json").unlink(missing_ok=True)
    at = Restored(ckpt["epoch"] + 1, ckpt["step"], ckpt["train_time"], ckpt["samples"],
                  recuts=recuts, recut=recut_from is not None, changes=changes,
                  changed=changes[-1]["settings"] if diff else {})
    torch.set_rng_state(ckpt["torch_rng"])
    if ckpt.get("batch") is not None:  # runtime.checkpoint_every: resume inside the epoch
        at.epoch, at.skip, at.sums = ckpt["epoch"], ckpt["batch"], tuple(ckpt["epoch_sums"])
    _drop_lines_after(run_dir, at.step, at.epoch)  # what a killed run wrote past it
    return at


def _load_checkpoint(ex, model, run_dir: Path, ckpt: dict) -> list[tuple] | None:
    """Load the checkpoint into `ex`; a checkpoint cut into other stages (another
    runtime.partition or executor) is re-cut first (recut.py).  Returns the old stages'
    members when it was re-cut, else None."""
    saved = ckpt["executor"]
    fitted = recut.fit(saved, run_dir, ex.stage_members(), model,
                       actors=not isinstance(ex, InProcessExecutor))
    if fitted is None:
        ex.load_saved_state(run_dir, saved)
        return None
    ex.load_saved_state(run_dir, {**fitted, "step": ckpt["step"],
                                  "recoveries": saved.get("recoveries", [])})
    return fitted["recut"]


def saved_cuts(cfg: Config, ckpt: dict | None) -> Config:
    """The config to build a resumed run's executor from.  `{stages: N, balance: cost}`
    times the units afresh at every start, and on a busy machine the timings can cut the
    units elsewhere than they were cut when the checkpoint was written; each actor's
    saved state then fits no actor.  The cut is the run's own, so a resumed run takes
    it from its checkpoint (the run's config.yaml keeps `balance: cost`)."""
    part = cfg.runtime.partition
    saved = ((ckpt or {}).get("executor") or {}).get("boundaries")
    if getattr(part, "balance", None) != "cost" or saved is None or len(saved) != part.stages - 1:
        return cfg
    runtime = cfg.runtime.model_copy(update={"partition": [int(b) for b in saved]})
    return cfg.model_copy(update={"runtime": runtime})


def _recorded(ckpt: dict) -> dict:
    """The config a checkpoint recorded, as `read_recorded` reads it."""
    cfg = read_recorded(ckpt["config"])
    return cfg.model_dump(mode="json") if cfg else ckpt["config"]


def finished_summary(run_dir: Path, ckpt: dict, cfg: Config) -> dict | None:
    """The recorded summary (plus `"finished": True`) when the run in run_dir has nothing
    left to train under `cfg`: its summary was written at the checkpoint's step, by this
    same config, which asks for no more steps.  A config that asks for more
    (train.epochs) is a continuation instead -- and so is this same config when a
    resume that re-cut the checkpoint (and so rewrote it at once, under this config)
    was killed before training on: the summary there is the steps before's."""
    summary = _summary_at(run_dir, ckpt["step"])
    if summary is None or _left(ckpt, cfg) or "config" not in ckpt or \
            _recorded(ckpt) != cfg.model_dump(mode="json"):
        return None
    return {**summary, "finished": True, "summary_path": str(run_dir / "summary.json")}


def _summary_at(run_dir: Path, step: int) -> dict | None:
    """summary.json, if it was written at `step`."""
    f = run_dir / "summary.json"
    summary = json.loads(f.read_text()) if f.exists() else None
    return summary if summary is not None and summary.get("steps") == step else None


def _trained(ckpt: dict) -> tuple[int, bool]:
    """(epochs the checkpoint has trained to their end, whether it is inside the next)."""
    mid = ckpt.get("batch") is not None  # runtime.checkpoint_every: a mid-epoch one
    return ckpt["epoch"] + (0 if mid else 1), mid


def _left(ckpt: dict, cfg: Config) -> bool:
    """Whether `cfg` asks for steps beyond the checkpoint's (no fewer: see
    refuse_nothing_to_train)."""
    full, mid = _trained(ckpt)
    return not ((not mid and cfg.train.epochs == full) or cfg.train.max_steps == ckpt["step"])


def refuse_nothing_to_train(run_dir: Path, ckpt: dict, cfg: Config) -> None:
    """A resume that would train no step under `cfg` and yet record `cfg` as the run's is
    refused before anything is built or written: one that asks for fewer epochs (or
    steps) than the checkpoint has trained -- its summary would misreport the run --, and
    one of a finished run with a `--set` that could apply to no step (config.yaml would
    name settings the run never trained with).  A run killed between its last checkpoint
    and its summary still goes on, under any executor, to write that summary."""
    t, step = cfg.train, ckpt["step"]
    full, mid = _trained(ckpt)
    if t.epochs < full + mid:
        raise ConfigError(
            f"train.epochs: {run_dir} has trained {counted(full, 'epoch')}"
            f"{' and part of the next' if mid else ''} (step {step}); --resume goes on from "
            f"there, so train.epochs must be at least {full + mid} (it is {t.epochs}).  "
            f"Nothing changed")
    if t.max_steps and t.max_steps < step:
        raise ConfigError(f"train.max_steps: {run_dir} has trained {counted(step, 'step')}; "
                          f"--resume goes on from there, so train.max_steps must be at least "
                          f"{step} (it is {t.max_steps}).  Nothing changed")
    if _left(ckpt, cfg) or _summary_at(run_dir, step) is None or "config" not in ckpt:
        return
    diff = config_diff(_recorded(ckpt), cfg.model_dump(mode="json"))
    if diff:
        shown = ", ".join(f"{k}={b} (the run's: {a})" for k, a, b in diff[:3])
        raise ConfigError(
            f"{diff[0][0]}: {run_dir} finished at step {step} ({counted(full, 'epoch')}), so --set "
            f"{shown}{', ...' if len(diff) > 3 else ''} would apply to no step.  Nothing "
            f"changed.  To train on with it, raise train.epochs above {full} as well")


def keep_recorded(summary: dict, path: Path) -> dict:
    """A value that is not finite never replaces a finite one already recorded (a run
    resumed with nothing left to evaluate would otherwise write NaN over its results)."""
    if not path.exists():
        return summary
    old = json.loads(path.read_text())
    for k, v in summary.items():
        if isinstance(v, float) and not math.isfinite(v) and isinstance(old.get(k), (int, float)) \
                and math.isfinite(old[k]):
            summary[k] = old[k]
    return summary


def logged_train_loss(run_dir: Path) -> float:
    """The last epoch's training loss in metrics.jsonl (NaN without one)."""
    f = run_dir / "metrics.jsonl"
    logged = [json.loads(ln) for ln in (f.read_text().splitlines() if f.exists() else [])
              if ln.strip() and _parses(ln)]
    return logged[-1].get("train_loss", float("nan")) if logged else float("nan")


def _parses(line: str) -> bool:
    """False for a line a killed writer left half-written."""
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _drop_lines_after(run_dir: Path, step: int, epoch: int) -> None:
    """On resume: forget steps.jsonl lines past the checkpoint's step and metrics.jsonl
    lines of epochs it had not finished (a killed run may have written them), and any
    line it was killed in the middle of."""
    for name, keep in (("steps.jsonl", lambda d: d.get("step", 0) <= step),
                       ("metrics.jsonl", lambda d: d.get("epoch", 0) < epoch)):
        f = run_dir / name
        if f.exists():
            lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if _parses(ln) and keep(json.loads(ln))]
            if len(kept) != len(lines):
                write_text(f, "".join(k + "\n" for k in kept))
