"""The figures of `localnet report` (curves, per-layer angles, each link's fidelity,
message bytes per edge, the actors' timelines), each drawn on a matplotlib Figure without
pyplot, so a headless machine and a test draw them alike."""

from __future__ import annotations

import math
import re
from pathlib import Path

from .files import counted
from .runs import Run


def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    return Figure(figsize=(w, h), layout="constrained")


def color_list(n: int, cmap: str = "tab10"):
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
    palette = dict(zip(names, color_list(len(names), "tab10" if len(names) <= 10 else "tab20"
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


def panel_grid(n: int, row_h: float = 3.9):
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
    fig, axes = panel_grid(len(series))
    for ax, (run, s) in zip(axes, series):
        for (layer, pts), c in zip(s.items(), color_list(len(s), "viridis")):
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
    fig, axes = panel_grid(len(series))
    for ax, (run, s) in zip(axes, series):
        low, high = 0.0, 1.0
        for kind, style in (("error", "-"), ("activation", "--")):
            links = s.get(kind, {})
            for (edge, pts), c in zip(links.items(), color_list(len(links), "viridis")):
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
    fig, axes = panel_grid(len(with_msgs), row_h=max(3.9, 1.3 + 0.14 * most))
    kinds = sorted({k for r in with_msgs for e in r.messages["edges"].values() for k in e})
    colors = dict(zip(kinds, color_list(len(kinds))))
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

    colors = dict(zip(_ACTIONS, color_list(len(_ACTIONS))))
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
