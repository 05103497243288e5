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
from pathlib import Path

from .config import flat_settings, setting_text
from .report_plots import plot_curves, plot_fidelity, plot_layer_angles, plot_messages, \
    plot_run_timelines
from .runs import Run, RunDirError, load_runs
from .timing import cpu_kinds


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
