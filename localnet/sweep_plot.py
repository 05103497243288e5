"""sweep.png: a sweep's accuracy against its error bits, and against each swept key.

One label per point, on one log axis, made an unreadable heap wherever points share their
bits (every codec's fp32 reference, every delay, every drop near it), and one line per rule
through all its points, sorted by bits, joined restrictions that have nothing to do with
each other.  So the first panel only scatters accuracy against error bits per sample (a
colour per rule), and each swept key but the rule gets a panel of its own: its values along
x in the order given, a line through the points that differ in that key alone.  A `--vary`
key's line starts at its reference, the point without it ("none").  A swept `seed` gets no
panel: each line is drawn through its seeds' mean, with their standard deviation as bars,
and a hollow marker where some of its seeds did not finish (the mean is of the others).
With --vary, a last panel draws what each restriction costs against its reference, seed
by seed (localnet/sweep_tables.py): a row per restriction, a dot per rule at its mean
points lost, a bar of one standard error each side.  Its x axis is linear within 1 point
of zero and logarithmic beyond, so int8's fraction of a point and sign's tens of points
both read.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

SEED = "seed"  # swept, its values are replicates of each point (localnet/sweep.py)


def finished(row: dict | None) -> bool:
    """A run that ended with an accuracy: not diverged, failed or missing."""
    return row is not None and row["status"] == "ok" and math.isfinite(row["test_accuracy"])


def panels(rows: list[dict], pts: list[list[tuple[str, str]]],
           same: dict | None = None) -> list[dict]:
    """For each swept key but rule.name: {"key", "values" (x categories), "lines"}, each
    line {"rule", "others" (the other keys' settings, as text), "points": [(x index,
    accuracy)]}.  rows[i] is the result of pts[i]; points that did not finish are left out.
    same: {a point's name: the grid point it also stands for} (a `--vary` value that
    restates the config's own ran once, under its own name): the other keys' reference."""
    # a swept seed is no axis: its runs are replicates of one point, drawn as their mean
    # and standard deviation
    keys = list(dict.fromkeys(k for p in pts for k, _ in p if k not in ("rule.name", SEED)))
    ran = [(p, r, finished(r))
           for p, r in zip(pts, rows)]
    out = []
    for key in keys:
        every = [(_without(dict(p), SEED), r, ok) for p, r, ok in ran]
        every += [(_without(dict(same[r["point"]]), SEED), r, ok) for p, r, ok in ran
                  if r["point"] in (same or {}) and key not in dict(p)]
        values = list(dict.fromkeys(v for p in pts for k, v in p if k == key))
        # a point without the key is the reference of the points that add it to its keys
        added_to = {frozenset(_without(t, key).items()) for t, _, ok in every if key in t and ok}
        refs = [key not in s and frozenset(s.items()) in added_to for s, _, _ in every]
        categories = (["none"] if any(r for r, (*_, ok) in zip(refs, every) if ok) else []) \
            + values
        lines: dict[tuple, list] = {}
        runs: dict[tuple, int] = {}  # (line, x) -> its runs, finished or not (its seeds)
        for (s, r, ok), ref in zip(every, refs):
            if key in s:
                at, others = categories.index(s[key]), _without(s, key)
            elif ref:
                at, others = 0, s
            else:
                continue
            text = " ".join(f"{k.removeprefix('channel.')}={v}" for k, v in others.items()
                            if k != "rule.name")
            runs[(r["rule"], text, at)] = runs.get((r["rule"], text, at), 0) + 1
            if ok:
                lines.setdefault((r["rule"], text), []).append((at, r["test_accuracy"]))
        out.append({"key": key, "values": categories,
                    "lines": [_line(rule, others, p, runs) for (rule, others), p in lines.items()]})
    return out


def _line(rule: str, others: str, points: list[tuple[int, float]], runs: dict) -> dict:
    """One line of a panel: {"rule", "others", "points": [(x, mean accuracy)], "sd": [the
    standard deviation at each x], "partial": [x where fewer runs finished than ran]}, the
    seeds of one setting averaged (without a swept seed: one run each, sd 0)."""
    at: dict[int, list[float]] = {}
    for x, acc in points:
        at.setdefault(x, []).append(acc)
    xs = sorted(at)
    return {"rule": rule, "others": others,
            "points": [(x, statistics.fmean(at[x])) for x in xs],
            "sd": [statistics.stdev(at[x]) if len(at[x]) > 1 else 0.0 for x in xs],
            # a mean of the seeds that finished, not of the others
            "partial": [x for x in xs if runs[(rule, others, x)] > len(at[x])]}


def cost_rows(cost: list[dict]) -> dict:
    """The cost panel's layout: {"labels": a row per restriction, in the sweep's order
    (with the grid point it varies where that is not the config itself), "dots": [(rule,
    y, points lost, its standard error (0: one seed))]}, each rule's dot shifted within
    its row so that rules at the same cost stay apart; restrictions none of whose pairs
    finished have a row and no dot."""
    labels = list(dict.fromkeys(_label(c) for c in cost))
    rules = list(dict.fromkeys(c["rule"] for c in cost))
    step = 0.6 / max(1, len(rules) - 1)
    dots = []
    for c in cost:
        if math.isnan(c["points_lost"]):
            continue
        y = labels.index(_label(c)) + (rules.index(c["rule"]) * step - 0.3 if len(rules) > 1 else 0)
        dots.append((c["rule"], y, c["points_lost"], 0.0 if math.isnan(c["se"]) else c["se"]))
    return {"labels": labels, "dots": dots}


def _label(c: dict) -> str:
    return c["restriction"] + ("" if c["against"] == "none" else f" at {c['against']}")


def _cost_panel(ax, cost: list[dict], colour: dict) -> None:
    layout = cost_rows(cost)
    for rule, y, lost, se in layout["dots"]:
        ax.errorbar(lost, y, xerr=se or None, fmt="o", color=colour[rule], ms=4, capsize=2)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xscale("symlog", linthresh=1)
    if layout["dots"]:  # room past the outermost bars, which autoscaling put on the frame
        ax.set_xlim(1.5 * min(-1, *(lost - se for _, _, lost, se in layout["dots"])),
                    1.5 * max(1, *(lost + se for _, _, lost, se in layout["dots"])))
    ax.set_yticks(range(len(layout["labels"])), layout["labels"], fontsize="x-small")
    ax.set_ylim(len(layout["labels"]) - 0.5, -0.5)  # the first restriction on top
    seeds = any(c["se"] == c["se"] for c in cost)
    ax.set(xlabel="test accuracy points lost against the reference",
           title="cost of each restriction, paired by seed" + (" (mean, se)" if seeds else ""))
    ax.grid(True, axis="x", which="both", alpha=0.3)


def _without(settings: dict, key: str) -> dict:
    return {k: v for k, v in settings.items() if k != key}


def write_png(rows: list[dict], pts: list[list[tuple[str, str]]], path: Path,
              same: dict | None = None, cost: list[dict] | None = None) -> Path:
    from matplotlib.lines import Line2D

    from .report_plots import color_list, panel_grid

    per_key = panels(rows, pts, same)
    fig, axes = panel_grid(1 + len(per_key) + bool(cost))
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    colour = dict(zip(rules, color_list(len(rules))))
    ax = axes[0]
    drawn = 0
    for rule in rules:
        mine = [r for r in rows if r["rule"] == rule and r["status"] == "ok"
                and r["error_bits_per_sample"] > 0]
        ax.scatter([r["error_bits_per_sample"] for r in mine],
                   [r["test_accuracy"] for r in mine], color=colour[rule], label=rule, s=18)
        drawn += len(mine)
    if drawn:  # (a log axis of no points is an error; the table says why none finished)
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no point finished", ha="center", transform=ax.transAxes)
    ax.set(xlabel="error bits per sample (all edges)", ylabel="test accuracy",
           title="accuracy vs. error-path communication")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small")
    styles = ["-", "--", ":", "-."]
    seeds = {v for p in pts for k, v in p if k == SEED}
    for ax, panel in zip(axes[1:], per_key):
        seen: dict[str, str] = {}  # the other keys' settings -> its line style
        for line in panel["lines"]:
            style = seen.setdefault(line["others"], styles[len(seen) % len(styles)])
            xs, ys = zip(*line["points"])
            ax.errorbar(xs, ys, yerr=line["sd"] if any(line["sd"]) else None, fmt=style,
                        marker="o", color=colour[line["rule"]], ms=4, capsize=3)
            part = [(x, y) for x, y in line["points"] if x in line["partial"]]
            if part:  # the mean of fewer seeds than ran (the others diverged or failed)
                ax.plot(*zip(*part), "o", ms=7, mfc="white", mec=colour[line["rule"]],
                        zorder=3)
        ax.set_xticks(range(len(panel["values"])), panel["values"], rotation=30, ha="right",
                      fontsize="small")
        ax.set(xlabel=panel["key"], ylabel="test accuracy", title=f"by {panel['key']}"
               + (f" (mean, sd of {len(seeds)} seeds)" if len(seeds) > 1 else ""))
        ax.grid(True, alpha=0.3)
        handles, labels = [], []
        if 1 < len(seen) <= len(styles):  # which line is which, beyond its rule's colour
            handles += [Line2D([], [], linestyle=s, color="grey") for s in seen.values()]
            labels += [o or "none" for o in seen]
        if any(line["partial"] for line in panel["lines"]):
            handles.append(Line2D([], [], ls="none", marker="o", mfc="white", mec="grey"))
            labels.append("not every seed finished")
        if handles:
            ax.legend(handles, labels, fontsize="xx-small")
    if cost:
        _cost_panel(axes[1 + len(per_key)], cost, colour)
    fig.savefig(path, dpi=110)
    return path
