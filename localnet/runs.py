"""A run directory read back: its summary, config, epoch and step lines, messages and
timeline, as one `Run` (a run still in progress, with no summary.json yet, is read from
its jsonl files); and a directory of runs (a sweep's, or an `out_dir`) as its runs.
`localnet report` and the sweep read runs through it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .files import lock_holder
from .timing import busy_s, cpu_label


@dataclass
class Run:
    path: Path
    label: str
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    epochs: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    messages: dict | None = None
    stopped: dict | None = None  # stopped.json: why it ended before its summary
    timeline: dict | None = None  # timeline.json: the actors' actions over a few steps

    @property
    def rule(self) -> str:
        return self.summary.get("rule") or (self.config.get("rule") or {}).get("name", "?")

    def alignment_series(self, key: str = "alignment",
                         field: str = "angle") -> dict[str, list[tuple[int, float]]]:
        """layer -> [(step, value)], from steps.jsonl and the epoch lines, by step: the
        angle in degrees, or with field="norm_ratio" |feedback| / |W| (records whose
        values are plain numbers, bp_update_angle's, are the value itself)."""
        points: dict[int, dict] = {}
        for rec in self.steps + (self.epochs if key == "alignment" else []):
            if rec.get(key):
                points.setdefault(int(rec["step"]), rec[key])
        out: dict[str, list] = {}
        for step in sorted(points):
            for layer, v in points[step].items():
                v = v.get(field) if isinstance(v, dict) else v
                if v is not None:
                    out.setdefault(layer, []).append((step, v))
        return out

    def fidelity_series(self, field: str = "cos") -> dict[str, dict[str, list]]:
        """kind -> link -> [(step, value)]: what arrived of each link's messages, epoch
        by epoch (the epoch lines' "fidelity": "cos", or "rest"), the links in the run's
        order; a record without the field (from before it was measured) is skipped."""
        out: dict[str, dict] = {}
        for rec in self.epochs:
            for kind, links in (rec.get("fidelity") or {}).items():
                for edge, f in links.items():
                    if f.get(field) is not None:
                        out.setdefault(kind, {}).setdefault(edge, []).append(
                            (rec["step"], f[field]))
        return out

    def final_alignment(self) -> dict[str, float]:
        if self.summary.get("alignment"):
            return dict(self.summary["alignment"])
        for rec in reversed(self.epochs):
            if rec.get("alignment"):
                return {k: v["angle"] for k, v in rec["alignment"].items()}
        return {}

    def row(self) -> dict:
        s = self.summary
        acc = s.get("test_accuracy", self.epochs[-1].get("test_accuracy") if self.epochs else None)
        angles = [v for v in self.final_alignment().values() if v is not None and not math.isnan(v)]
        bps = None
        if self.messages and self.messages.get("bytes_per_sample") is not None:
            bps = float(self.messages["bytes_per_sample"])
        elif s.get("channels"):  # in-process there is no wire: what the channels carried
            ch = s["channels"]
            bps = ch.get("activation_bytes_per_sample", 0) + ch.get("error_bytes_per_sample", 0)
        return {"run": self.label, "rule": self.rule,
                "model": s.get("model") or (self.config.get("model") or {}).get("name"),
                "dataset": s.get("dataset") or (self.config.get("data") or {}).get("name"),
                "epochs": s.get("epochs", len(self.epochs)),
                "test_accuracy": acc,
                "alignment_deg": sum(angles) / len(angles) if angles else None,
                "samples_per_s": s.get("samples_per_s"),
                "bytes_per_sample": bps,
                # what arrives of each error message (channels/README.md): beside the
                # bytes, it says whether a restriction kept the errors' directions
                "error_cos": (s.get("channels") or {}).get("error_cos"),
                "cores_busy": self.cores_busy(),
                "executor": (s.get("runtime") or {}).get("executor")
                            or (self.config.get("runtime") or {}).get("executor"),
                "state": self.state(), "stopped": self.stopped,
                "resumed_with": s.get("resumed_with"),
                "constant_output": s.get("constant_output"),
                "loss_above_chance": s.get("loss_above_chance"),
                "cpu": cpu_label(s.get("cpu"))}

    def cores_busy(self) -> float | None:
        """The share of the machine's cores busy while the run trained (summary.json
        `machine_cpu_s`; every process on the machine counts): near 1, the run was bound
        by CPU; well below, by waiting (a pipeline's bubble, a slow peer)."""
        cpu = self.summary.get("machine_cpu_s") or {}
        total = sum(cpu.values())
        return busy_s(cpu) / total if total else None

    def state(self) -> str:
        """"done" (a summary was written); how it ended, for a run that recorded it
        (stopped.json: diverged, interrupted, failed); else the last step its logs reach,
        and whether the process holding the run directory is still there: "running",
        or "killed" when it died without a word (kill -9, out of memory, a lost
        machine); a holder on another host is named, as this one cannot see it."""
        if self.summary:
            return "done"
        if self.stopped:
            how, after = self.stopped.get("how", "stopped"), self.stopped.get("after_step")
            if after is None:
                return how
            # a divergence is the step whose loss was not finite (its error message's step)
            if how == "diverged":
                return f"diverged at step {after + 1}"
            # and a resume trains the steps since the checkpoint again: how many is worth
            # a glance before resuming, or before stopping the next one mid-epoch
            kept = self.stopped.get("checkpoint_step")
            return f"{how} after step {after}" + (
                f", checkpoint {kept}" if kept is not None and kept < after else
                ", none saved" if kept is None else "")
        last = max((int(r.get("step", 0)) for r in self.steps + self.epochs), default=0)
        at = f"step {last}" if last else "no step"
        holder = lock_holder(self.path)
        if holder and holder["alive"] is not None:
            return f"{'running' if holder['alive'] else 'killed'}, {at}"
        where = f" (pid {holder['pid']} on {holder['host']})" if holder and holder["host"] else ""
        return (f"at {at}" if last else at) + where


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return out


class RunDirError(ValueError):
    """A run directory's file that does not parse; the message names it."""


def _parsed(path: Path, parse):
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as err:  # json's decode error is a ValueError
        raise RunDirError(f"report: {path} does not parse ({err}); repair or remove "
                          f"it") from None


_RUN_FILES = ("summary.json", "metrics.jsonl", "steps.jsonl")


def load_run(path: str | Path, label: str | None = None) -> Run:
    path = Path(path)
    if path.is_file():  # a shell glob such as runs/* also matches each run's log file
        raise FileNotFoundError(f"report: {path} is a file, not a run directory; name the "
                                f"directories (a glob such as runs/*/ matches only them)")
    if not path.is_dir():
        raise FileNotFoundError(f"report: no run directory {path}")
    if not _is_run(path):
        raise FileNotFoundError(f"report: {path} is not a run directory (no summary.json, "
                                f"metrics.jsonl or steps.jsonl), nor a directory of runs")
    run = Run(path=path, label=label or path.name)
    if (path / "summary.json").exists():
        run.summary = _parsed(path / "summary.json", json.loads)
    if (path / "config.yaml").exists():
        run.config = _parsed(path / "config.yaml", yaml.safe_load) or {}
    if (path / "stopped.json").exists():
        run.stopped = _parsed(path / "stopped.json", json.loads)
    run.epochs = _jsonl(path / "metrics.jsonl")
    run.steps = _jsonl(path / "steps.jsonl")
    if (path / "messages.json").exists():
        run.messages = _parsed(path / "messages.json", json.loads)
    if (path / "timeline.json").exists():
        run.timeline = _parsed(path / "timeline.json", json.loads)
    return run


def _is_run(path: Path) -> bool:
    return any((path / f).exists() for f in _RUN_FILES)


def _expand(path: Path) -> list[tuple[Path, str]]:
    """A run directory as itself; a directory of runs (a sweep's, or an `out_dir`) as
    the run directories in it, in name order, and those of the directories of runs in it
    (`runs/` holds its sweeps' directories: `runs/sweep-<time>/<point>`), each with its
    label (`sweep-<time>/<point>`)."""
    if not path.is_dir() or _is_run(path):
        return [(path, path.resolve().name)]
    found = []
    for p in sorted(q for q in path.iterdir() if q.is_dir()):
        if _is_run(p):
            found.append((p, p.name))
        else:
            found += [(q, f"{p.name}/{q.name}")
                      for q in sorted(r for r in p.iterdir() if r.is_dir() and _is_run(r))]
    return found or [(path, path.resolve().name)]


def load_runs(paths) -> list[Run]:
    # a run named twice (`report runs/sweep/a runs/sweep`, a shell glob beside its folder)
    # is one run: listed twice, its row and curves would read as two results
    first: dict[Path, tuple[Path, str]] = {}
    for q, label in (q for p in paths for q in _expand(Path(p))):
        first.setdefault(q.resolve(), (q, label))
    paths, labels = [q for q, _ in first.values()], [lab for _, lab in first.values()]
    if len(set(labels)) < len(labels):  # same directory names: add the parent
        labels = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    return [load_run(p, lab) for p, lab in zip(paths, labels)]
