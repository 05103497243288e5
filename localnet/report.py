"""`localnet report RUN_DIR [RUN_DIR ...]`: plots of finished (or running) runs, and a
side-by-side table.

Writes into --out (default RUN_DIR/report for one run, ./report for several):
  curves.png           loss and accuracy against optimizer steps (train and test; a colour
                       per run, or per rule beyond 20 runs)
  alignment.png        per-layer angle between W and the feedback, over steps (one panel
                       per run, for the first MAX_PANELS runs; the layers by a legend, or
                       beyond LEGEND_LAYERS by a colour bar of depth)
  norm_ratio.png       per-layer |feedback| / |W| over steps, as alignment.png (fixed
                       feedback, FA's: a falling ratio is W growing)
  bp_update_angle.png  per-layer angle between the rule's update and BP's gradient (only
                       for runs with metrics.bp_angle)
  fidelity.png         what arrives of each link's messages, cos(sent, decoded), per link
                       and epoch (only for runs with channels; one panel per run)
  fidelity_rest.png    what arrives besides each message's own direction, over its size
                       (the same runs): read with fidelity.png, as one cosine can hide a
                       small rest or a large one
  messages.png         message bytes per edge, a bar per kind (only for runs with a
                       messages.json: the Ray executor)
  timeline.png         each actor's forwards, backwards and updates over a few steps, as
                       they ran (only for runs with a timeline.json: the Ray executor;
                       one panel per run, for the first MAX_PANELS runs)

and prints one row per run: rule, test accuracy, mean alignment angle, samples/s, the
share of the machine's cores busy while it trained, and message bytes per training
sample (the Ray executor's messages; in-process, the encoded activations and errors of a
run with `channel.enabled`); under it, each run's settings that the others do not share.
Reads metrics.jsonl, steps.jsonl, summary.json, messages.json, timeline.json and
config.yaml; a run still in progress (no summary.json yet) is read from its jsonl files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import flat_settings, setting_text
from .files import counted, lock_holder
from .timing import busy_s, cpu_kinds, cpu_label


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


# ------------------------------------------------------------------ plots


def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    return Figure(figsize=(w, h), layout="constrained")


def _colors(n: int, cmap: str = "tab10"):
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    if cmap == "tab10":
        return [cm(i % 10) for i in range(n)]
    return [cm(i / max(n - 1, 1)) for i in range(n)]


def plot_curves(runs: list[Run], path: Path) -> Path:
    curves_figure(runs).savefig(path, dpi=110)
    return path


def curves_figure(runs: list[Run]):
    """Loss and accuracy against steps: a colour per run, a line style per series, and one
    legend beside both panels.  A sweep's directory brings dozens of runs: ten colours
    repeated, a legend per panel covered them, and a diverged run's loss (1e16) flattened
    every other run against the axis."""
    from matplotlib.lines import Line2D

    # beyond 20 runs (a sweep's directory) no colour or legend line a run tells them
    # apart: a colour per rule, which is what a sweep compares
    by_rule = len(runs) > 20
    names = list(dict.fromkeys(run.rule for run in runs)) if by_rule else \
        [run.label for run in runs]
    columns = math.ceil((len(names) + 3) / 28)  # the legend's: a name each, and 3 styles
    fig = _figure(8.5 + 3 * columns, 4.2)
    # one step axis for both: a one-epoch run's accuracy is a single step, and alone it
    # was drawn on an axis of its own (9.6 to 10.4) beside the loss's steps 1 to 10
    ax_loss, ax_acc = fig.subplots(1, 2, sharex=True)
    palette = dict(zip(names, _colors(len(names), "tab10" if len(names) <= 10 else "tab20"
                                      if len(names) <= 20 else "turbo")))
    colours = [palette[run.rule if by_rule else run.label] for run in runs]
    firsts = []  # each run's first logged loss: what an untrained network scores
    for run, c in zip(runs, colours):
        if run.steps:
            xs = [r["step"] for r in run.steps if "loss" in r]
            ys = [r["loss"] for r in run.steps if "loss" in r]
            ax_loss.plot(xs, ys, color=c, lw=0.8, alpha=0.45,
                         marker="." if len(xs) < 3 else None)  # a lone point shows too
            firsts += ys[:1]
        ep = [e for e in run.epochs if "step" in e]
        if ep:
            xs = [e["step"] for e in ep]
            # train and test differ in marker too: one epoch draws points, not lines
            for key, style, mk in (("train", "--", "s"), ("test", "-", "o")):
                if any(f"{key}_loss" in e for e in ep):
                    ys = [e.get(f"{key}_loss", math.nan) for e in ep]
                    ax_loss.plot(xs, ys, style, color=c, marker=mk, ms=3)
                    firsts += [y for y in ys[:1] if not run.steps]
                if any(f"{key}_accuracy" in e for e in ep):
                    ax_acc.plot(xs, [e.get(f"{key}_accuracy", math.nan) for e in ep], style,
                                color=c, marker=mk, ms=3)
    ax_loss.set(title="loss", xlabel="optimizer step", ylabel="cross-entropy")
    losses = [v for line in ax_loss.get_lines() for v in line.get_ydata() if math.isfinite(v)]
    if losses and min(losses) > 0:
        ax_loss.set_yscale("log")
    firsts = sorted(v for v in firsts if math.isfinite(v) and v > 0)
    if firsts and max(losses) > 10 * firsts[len(firsts) // 2]:
        # a run that diverged: its loss would set the scale for all
        ax_loss.set_ylim(top=10 * firsts[len(firsts) // 2])
        ax_loss.set_title("loss (a run diverged: cut at 10x the first)")
    ax_acc.set(title="accuracy", xlabel="optimizer step", ylabel="fraction correct")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    counts = {n: sum(run.rule == n for run in runs) for n in names} if by_rule else {}
    handles = [Line2D([], [], color=c, lw=2, label=f"{n} ({counts[n]} runs)" if by_rule else n)
               for n, c in palette.items()]
    handles += [Line2D([], [], color="grey", lw=0.8, alpha=0.45, label="train (batch)"),
                Line2D([], [], color="grey", ls="--", marker="s", ms=3, label="train (epoch)"),
                Line2D([], [], color="grey", marker="o", ms=3, label="test")]
    fig.legend(handles=handles, loc="outside right upper", fontsize="x-small", ncol=columns)
    return fig


def _panels(n: int, row_h: float = 3.9):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(5.2 * cols, row_h * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _saved(fig, path: Path) -> Path | None:
    """The figure written to path (None, and nothing written, where there was none)."""
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    return path


def _panel_title(ax, text: str) -> None:
    """A panel's title, wrapped to its panel: a sweep's point names
    (rule.name-fa__channel.edges-_2_error_codec_sign_...) ran into the next panel."""
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(text, 56)), fontsize="medium")


def plot_layer_angles(runs: list[Run], path: Path, key: str, ylabel: str,
                      field: str = "angle") -> Path | None:
    return _saved(layer_angles_figure(runs, key, ylabel, field), path)


def layer_angles_figure(runs: list[Run], key: str, ylabel: str, field: str = "angle"):
    """An angle (or with field="norm_ratio", |feedback| / |W|) per layer against steps, a
    panel per run that has them (None: none)."""
    series = [(run, run.alignment_series(key, field)) for run in runs]
    series = [(run, s) for run, s in series if s]
    if not series:
        return None
    fig, axes = _panels(len(series))
    for ax, (run, s) in zip(axes, series):
        for (layer, pts), c in zip(s.items(), _colors(len(s), "viridis")):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, lw=1.2, label=layer,
                    marker="." if len(pts) < 3 else None)  # a lone point shows too
        _panel_title(ax, f"{run.label} ({run.rule})")
        ax.set(xlabel="optimizer step", ylabel=ylabel)
        top = max(p[1] for pts in s.values() for p in pts)
        # angles: room above 90 degrees, where untrained feedback starts (on the frame
        # otherwise); ratios from 0, where a weight that outgrows its feedback heads
        ax.set_ylim(0, max(95.0, 1.05 * top) if field == "angle" else 1.05 * top)
        ax.grid(alpha=0.3)
        _layer_key(fig, ax, list(s))
    return fig


def plot_fidelity(runs: list[Run], path: Path, field: str = "cos") -> Path | None:
    return _saved(fidelity_figure(runs, field), path)


_FIDELITY_AXES = {  # field: what the axis says; 1 is always shown: for cos, the link
    "cos": "cos(sent, arrived)",  # delivers its messages' directions whole; for rest
    "rest": "rest of arrived / |sent|",  # (off the message's direction), the message's size
}


def fidelity_figure(runs: list[Run], field: str = "cos"):
    """What arrives of each link's messages against steps, a panel per run that measured
    it: the cosine between what the sender made and what the receiver decoded, or with
    field="rest" the rest besides the message's own direction over the message's size
    (channel.fidelity).  A line per link, coloured by depth, errors solid and
    activations dashed (None: no run did)."""
    series = [(run, run.fidelity_series(field)) for run in runs]
    series = [(run, s) for run, s in series if s]
    if not series:
        return None
    fig, axes = _panels(len(series))
    for ax, (run, s) in zip(axes, series):
        low, high = 0.0, 1.0
        for kind, style in (("error", "-"), ("activation", "--")):
            links = s.get(kind, {})
            for (edge, pts), c in zip(links.items(), _colors(len(links), "viridis")):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=c, lw=1.2,
                        label=edge if kind == "error" or "error" not in s else None,
                        marker="." if len(pts) < 3 else None)  # a lone point shows too
                low, high = min(low, *(p[1] for p in pts)), max(high, *(p[1] for p in pts))
        kinds = " solid, ".join(k for k in ("error", "activation") if k in s)
        _panel_title(ax, f"{run.label} ({run.rule})")
        ax.set(xlabel="optimizer step",
               ylabel=f"{_FIDELITY_AXES[field]}: {kinds}{' dashed' if len(s) > 1 else ''}")
        ax.set_ylim(low, 1.02 * high)
        ax.grid(alpha=0.3)
        main = s.get("error") or s.get("activation")
        _layer_key(fig, ax, list(main), title="link (input -> output)")
    return fig


LEGEND_LAYERS = 12  # beyond: a colour bar; ResNet-56's 57 layers' legend outgrew the panel


def _layer_key(fig, ax, layers: list[str], title: str = "layer (input -> output)") -> None:
    """Which colour is which layer: a legend for a few layers, else a colour bar of depth
    (viridis, input to output) that names a few of them."""
    if len(layers) <= LEGEND_LAYERS:
        ax.legend(fontsize="xx-small", title=title, title_fontsize="xx-small")
        return
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(layers)
    bar = fig.colorbar(ScalarMappable(Normalize(0, n - 1), "viridis"), ax=ax, aspect=30)
    ticks = sorted({round(i * (n - 1) / 4) for i in range(5)})
    bar.set_ticks(ticks, labels=[layers[i] for i in ticks], fontsize="xx-small")
    bar.set_label(title, fontsize="xx-small")


def natural_key(name: str) -> list:
    """Sort key that reads the numbers in a name as numbers: stage2->stage1 comes before
    stage10->stage9, so a plot lists the edges in the pipeline's order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def plot_messages(runs: list[Run], path: Path) -> Path | None:
    return _saved(messages_figure(runs), path)


def _actor_names(run: Run) -> dict[str, str]:
    """stageN -> what that actor holds (its unit, or first..last unit), from summary.json:
    stage13->stage14 says nothing of where in the net an edge runs."""
    units = ((run.summary.get("runtime") or {}).get("units")) or []
    return {f"stage{i}": u[0] if len(u) == 1 else f"{u[0]}..{u[-1]}"
            for i, u in enumerate(units) if u}


def messages_figure(runs: list[Run]):
    """Bytes per edge, a bar per kind, a panel per run that sent messages (None: no such
    run).  A row's height grows with its panels' edges: ResNet-20 per layer has 61, and
    their names ran into one another at the height of a per-unit run's 31."""
    with_msgs = [r for r in runs if r.messages and r.messages.get("edges")]
    if not with_msgs:
        return None
    from matplotlib.ticker import EngFormatter

    most = max(len(r.messages["edges"]) for r in with_msgs)
    fig, axes = _panels(len(with_msgs), row_h=max(3.9, 1.3 + 0.14 * most))
    kinds = sorted({k for r in with_msgs for e in r.messages["edges"].values() for k in e})
    colors = dict(zip(kinds, _colors(len(kinds))))
    for ax, run in zip(axes, with_msgs):
        edges = run.messages["edges"]
        names = sorted(edges, key=natural_key)
        present = [k for k in kinds if any(edges[e].get(k, {}).get("bytes") for e in names)]
        h = 0.8 / max(len(present), 1)
        for j, kind in enumerate(present):  # grouped, not stacked: a log axis
            vals = [float(edges[e].get(kind, {}).get("bytes", 0)) for e in names]
            ys = [i - 0.4 + h * (j + 0.5) for i in range(len(names))]
            ax.barh(ys, vals, height=h, color=colors[kind])
        actor = _actor_names(run)
        ax.set_yticks(range(len(names)), ["->".join(actor.get(end, end) for end in e.split("->"))
                                          for e in names])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
        _panel_title(ax, f"{run.label} ({run.rule}): bytes per edge")
        ax.set(xlabel="bytes sent (log)")
        ax.tick_params(axis="y", labelsize="x-small")
        ax.grid(axis="x", alpha=0.3)
    # one legend, below the panels: the longest bars reach the right edge, where a legend
    # would hide them, and a kind has one colour in every panel
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=colors[k], label=k) for k in kinds],
               loc="outside lower center", ncol=len(kinds), fontsize="x-small", frameon=False)
    return fig


_ACTIONS = {"F": "forward", "B": "backward", "STEP": "update"}


def _gantt(ax, lines, names: list[str], title: str) -> None:
    """Bars [actor, op, micro-batch, start s, end s] on ax, a row per actor."""
    from matplotlib.patches import Patch

    colors = dict(zip(_ACTIONS, _colors(len(_ACTIONS))))
    span = max((t1 for *_, t1 in lines), default=0.0) or 1.0
    for s, op, mb, t0, t1 in lines:
        ax.barh(s, (t1 - t0) * 1e3, left=t0 * 1e3, height=0.7, color=colors[op],
                edgecolor="white", linewidth=0.4)
        if mb >= 0 and (t1 - t0) > 0.025 * span:  # the micro-batch, where it fits
            ax.text((t0 + t1) / 2 * 1e3, s, str(mb), ha="center", va="center",
                    fontsize="xx-small", color="white")
    ax.set_yticks(range(len(names)), [n if len(n) <= 28 else n[:25] + "..." for n in names])
    ax.invert_yaxis()  # the first actor on top, as the data flows down the page
    ax.tick_params(axis="y", labelsize="x-small")
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize="small")
    ax.legend(handles=[Patch(color=colors[k], label=v) for k, v in _ACTIONS.items()],
              fontsize="x-small", loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)


def plot_timeline(plan: dict, path: Path) -> Path:
    """`localnet simulate --plot`: the simulated schedule as a Gantt chart, a row per
    actor, each action a bar from its start to its end (a received message's CPU
    included, as the simulator charges it).  The gaps in a row are that actor's bubble;
    with fewer cores than actors (--cores, --costs-from), also the time it waited for a
    core."""
    S, lines = plan["stages"], plan["timeline"]
    fig = _figure(11, 1.2 + 0.32 * S)
    cores, batches = plan.get("cores"), plan.get("batches", 1)
    if cores:  # with fewer cores than actors every row has gaps: how full the cores were
        span = max((t1 for *_, t1 in lines), default=0.0) or 1.0
        busy = sum(t1 - t0 for *_, t0, t1 in lines) / (cores * span)
        where = f"{counted(cores, 'core')}, {busy:.0%} busy"
    else:
        where = f"a core per actor; bubble {plan['bubble_fraction']:.0%}"
    _gantt(fig.subplots(), lines, plan.get("names") or [f"stage{i}" for i in range(S)],
           f"{plan['schedule']}: {counted(S, 'actor')} x "
           f"{counted(plan['micro_batches'], 'micro-batch')}"
           f"{f', {batches} batches streamed' if batches > 1 else ''}, {where}; "
           f"{plan['samples_per_s']:.0f} samples/s predicted")
    fig.savefig(path, dpi=110)
    return path


def actions_fill(timeline: dict, cores: int) -> float:
    """The share of `cores` that a timeline's actions kept busy from its first start to
    its last end (each action runs on one core, to its end, under runtime.cpu_policy rr)."""
    spans = timeline["spans"]
    wall = max((s[5] for s in spans), default=0.0) - min((s[4] for s in spans), default=0.0)
    return sum(s[5] - s[4] for s in spans) / (cores * wall) if wall > 0 else 0.0


def plot_run_timelines(runs: list[Run], path: Path) -> Path | None:
    """timeline.json of each run that has one (localnet/timeline.py): its actors'
    actions as they ran, one panel per run."""
    with_tl = [r for r in runs if r.timeline and r.timeline.get("spans")]
    if not with_tl:
        return None
    rows = [len(r.timeline["actors"]) for r in with_tl]
    fig = _figure(11, sum(1.4 + 0.32 * n for n in rows))
    axes = fig.subplots(len(with_tl), 1, squeeze=False, height_ratios=rows).ravel()
    for ax, run in zip(axes, with_tl):
        tl = run.timeline
        first, last = tl["steps"]
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        # actors sharing fewer cores (summary.json runtime.crowding): how much of those
        # cores the actions filled; the rest went to receiving, the data plane's
        # threads, the coordinator -- or stood idle
        cores = ((run.summary.get("runtime") or {}).get("crowding") or [None, None])[1]
        fill = f"; the actions fill {actions_fill(tl, cores):.0%} of {cores} cores" \
            if cores else ""
        _gantt(ax, [[a, op, mb, t0, t1] for a, op, _, mb, t0, t1 in tl["spans"]],
               tl["actors"], f"{run.label}: {tl['schedule']}, "
                             f"{counted(len(tl['actors']), 'actor')} x "
                             f"{counted(tl['micro_batches'], 'micro-batch')}, "
                             f"{steps} as they ran{fill}")
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------ the command


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


STATE_LEGEND = ("state of a run with no summary yet, at the last step it logged (test acc: its "
                "last epoch's): running; killed (gone without a word: kill -9, out of "
                "memory); how it stopped (stopped.json); or \"at step N\" (on another host, "
                "or from before run locks).  localnet run --resume goes on.")


def table(runs: list[Run]):
    """The side-by-side table, with the legend of its state column when it has one."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rows = [run.row() for run in runs]
    unfinished = any(r["state"] != "done" for r in rows)
    t = Table(title="runs (alignment: mean over layers of the final angle(W, feedback))",
              box=box.SIMPLE_HEAD)
    # headers of two short lines, so the numbers fit a terminal of 80 columns beside a
    # run's name; a narrow one wraps the name and the state, never a number or a rule
    cols = [("run", "left"), ("rule", "left"), ("test\nacc", "right"), ("align.\ndeg", "right"),
            ("samples\n/s", "right"), ("cores\nbusy", "right"), ("bytes\n/sample", "right")]
    cos = any(r["error_cos"] is not None for r in rows)  # a column only where channels ran
    for col, just in cols + ([("error\ncos", "right")] if cos else []) \
            + ([("state", "left")] if unfinished else []):
        t.add_column(col, justify=just, overflow="fold", no_wrap=col not in ("run", "state"),
                     min_width={"run": 10, "state": 12}.get(col))
    for r in rows:
        t.add_row(r["run"], r["rule"], _fmt(r["test_accuracy"], ".4f"),
                  _fmt(r["alignment_deg"], ".1f"), _fmt(r["samples_per_s"], ".1f"),
                  _fmt(r["cores_busy"], ".0%"), _fmt(r["bytes_per_sample"], ",.0f"),
                  *([_fmt(r["error_cos"], ".3f")] if cos else []),
                  *([r["state"]] if unfinished else []))
    # below the table, not its caption: rich sizes a caption to the table, which at the
    # terminal's full width crops the caption's lines instead of wrapping them
    below = [Text(STATE_LEGEND, style="dim")] if unfinished else []
    # a run whose settings changed on a resume is not the run its config.yaml describes
    below += [Text(f"{r['run']}: resumed with other settings, " + "; ".join(
        f"at step {c['at_step']} " + ", ".join(f"{k} {a} -> {b}"
                                               for k, (a, b) in c["settings"].items())
        for c in r["resumed_with"])) for r in rows if r.get("resumed_with")]
    below += _differences_below(runs)
    below += _cpus_below(rows)
    # a run that learned nothing after some step: its accuracy alone reads as a poor rule
    below += [Text(f"{r['run']}: the training loss sat at {r['constant_output']['loss']:g} (ln "
                   f"of the classes: an output that ignores its input) by step "
                   f"{r['constant_output']['after_step']}; a warm-up or a lower rate (README)")
              for r in rows if r.get("constant_output")]
    # a run that classifies most images right at a loss worse than chance's: its
    # accuracy alone reads as a rule a little worse, not as weights grown unstable
    below += [Text(f"{r['run']}: epoch {b['epoch']}'s {b['on']} loss {b['loss']:g} was above ln "
                   f"of the classes ({b['chance_loss']:g}) at accuracy {b['accuracy']:.4f}: "
                   f"huge logits (a rate past the rule's stable one, or an error channel; "
                   f"README, \"Models\")")
              for r in rows if (b := r.get("loss_above_chance"))]
    return Group(t, *below) if below else t


MAX_PANELS = 24  # runs drawn in a plot of a panel per run
# keys that say where a run went, not how it trained; and the rule, which has its column
_NOT_A_DIFFERENCE = ("name", "out_dir", "rule.name")


def differences(runs: list[Run]) -> dict[str, list[str]]:
    """label -> the settings ('key=value') in which that run differs from the others
    (their config.yaml): a table of accuracies means little before one knows what set
    the runs apart.  A key one run has and another lacks counts too: a rule's or codec's
    options exist only under that rule or codec (fa's feedback_gain, none for bp)."""
    flat = {run.label: flat_settings(run.config) for run in runs if run.config}
    if len(flat) < 2:
        return {}
    keys = sorted({k for settings in flat.values() for k in settings} - set(_NOT_A_DIFFERENCE))
    keys = [k for k in keys if len({json.dumps(settings.get(k, "<absent>"), sort_keys=True,
                                               default=str) for settings in flat.values()}) > 1]
    return {label: [setting_text(k, settings[k]) for k in keys if k in settings]
            for label, settings in flat.items()}


def _differences_below(runs: list[Run]) -> list:
    """What set the runs apart, under the table, unless the runs' names say it already
    (a sweep names each point by its keys): a run's settings wrap beside its name."""
    from rich.table import Table
    from rich.text import Text

    diff = {label: items for label, items in differences(runs).items() if items}
    if not diff or all(all(item.split("=")[0] in label for item in items)
                       for label, items in diff.items()):
        return []
    grid = Table.grid(padding=(0, 1))
    grid.add_column(overflow="fold")
    grid.add_column(overflow="fold")
    for label in list(diff)[:MAX_PANELS]:
        # Text, not markup: a value such as [64, 64] would read as a style
        grid.add_row(Text(f"  {label}:"), Text(", ".join(diff[label])))
    more = [Text(f"  ... the first {MAX_PANELS} of {len(diff)} runs; --json lists every run's")
            ] if len(diff) > MAX_PANELS else []
    return [Text("what differs between the runs (their config.yaml):"), grid, *more]


def _cpus_below(rows: list[dict]) -> list:
    """Which runs ran on which kind of CPU, where they ran on more than one."""
    from rich.text import Text

    kinds = cpu_kinds(rows, "run")
    if not kinds:
        return []
    return [Text(f"these runs ran on {len(kinds)} kinds of CPU, whose kernels round "
                 f"differently (the same settings end elsewhere on each; RESULTS.md, \"the "
                 f"same command on two boxes\"):")] + [Text(f"  {k}") for k in kinds]


def report(paths, out: str | Path | None = None) -> dict:
    """Plots for the runs at `paths`; returns {"files": [...], "rows": [...],
    "skipped": {plot: why}, "notes": {plot: what it leaves out}}."""
    runs = load_runs(paths)
    if not runs:
        raise ValueError("report: give at least one run directory")
    paths = list(paths)  # one directory (a run, or a sweep's runs): its report/ beside them
    out = Path(out) if out else (Path(paths[0]) / "report" if len(paths) == 1 else Path("report"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the plots go into a directory
        raise RunDirError(f"report: --out {out}: a file is in the way (it names the "
                          f"directory the plots go into)") from None
    files, skipped, notes = [plot_curves(runs, out / "curves.png")], {}, {}

    def panel_each(has, plot):
        """A plot of a panel per run that has what it draws, for the first MAX_PANELS of
        them: a sweep's 198 runs drew a figure 23,000 pixels tall."""
        def draw(path: Path) -> Path | None:
            having = [run for run in runs if has(run)]
            if len(having) > MAX_PANELS:
                notes[path.name] = (f"the first {MAX_PANELS} of the {len(having)} runs that "
                                    f"have it, a panel each; name the runs to see others "
                                    f"(localnet report DIR/RUN ...)")
            return plot(having[:MAX_PANELS], path)
        return draw

    def angles(key: str, ylabel: str, field: str = "angle"):
        return panel_each(lambda run: run.alignment_series(key, field),
                          lambda having, path: plot_layer_angles(having, path, key, ylabel,
                                                                 field))

    unaligned = ("no alignment recorded (metrics.alignment_every, or a rule without "
                 "feedback weights)")
    for name, draw, why in (
            ("alignment.png", angles("alignment", "angle(W, feedback) (deg)"), unaligned),
            ("norm_ratio.png", angles("alignment", "|feedback| / |W|", "norm_ratio"),
             unaligned),
            ("bp_update_angle.png",
             angles("bp_update_angle", "angle(update, BP gradient) (deg)"),
             "no run measured it (metrics.bp_angle: true)"),
            ("fidelity.png", panel_each(lambda run: run.fidelity_series(), plot_fidelity),
             "no run recorded what its links deliver (channel.enabled: each epoch's "
             "line has it per link)"),
            ("fidelity_rest.png",
             panel_each(lambda run: run.fidelity_series("rest"),
                        lambda having, path: plot_fidelity(having, path, "rest")),
             "no run recorded the rest its links deliver (channel.enabled, from when "
             "each epoch's line had it)"),
            ("messages.png", lambda path: plot_messages(runs, path),
             "no messages.json: the Ray executor writes it at each epoch's end "
             "(runtime.executor: ray; a run that stopped in its first epoch has none)"),
            ("timeline.png", panel_each(lambda run: run.timeline and run.timeline.get("spans"),
                                        plot_run_timelines),
             "no timeline.json: only actors note their actions (runtime.executor: ray, "
             "metrics.timeline_steps > 0), once those steps are done")):
        p = draw(out / name)
        if p:
            files.append(p)
        else:
            skipped[name] = why
    rows, diff = [r.row() for r in runs], differences(runs)
    for row in rows:
        row["differs"] = diff.get(row["run"], [])
    return {"files": [str(f) for f in files], "rows": rows,
            "skipped": skipped, "notes": notes, "runs": runs}
