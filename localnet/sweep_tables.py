"""The tables a sweep writes from its runs' rows: sweep.csv (a row per run), sweep.md,
and, with a swept seed, each point's mean over its seeds (sweep_seeds.csv), and, with
--vary, what each restriction costs against its reference (sweep_costs.csv).

A seed fixes a run's initial weights, its batches and its channels' random streams, and
the accuracy moves from seed to seed by as much as a mild restriction costs, or more.  A
restricted run and its reference at the same seed differ only in the restriction, so
their difference leaves the seed's own share out; its mean over the seeds, with that
mean's standard error, says whether the restriction costs more than the noise, which two
means with overlapping deviations do not.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from .sweep_plot import SEED, finished
from .timing import cpu_kinds

COLUMNS = ["rule", "restriction", "test_accuracy", "test_loss", "error_bits_per_sample",
           "error_cos", "error_rest", "wall_s", "status", "point", "loss_above_chance", "cpu"]


def _text(pairs) -> str:
    return " ".join(f"{k.removeprefix('channel.')}={v}" for k, v in pairs) or "none"


def restriction(point: list[tuple[str, str]]) -> str:
    return _text([kv for kv in point if kv[0] != "rule.name"])


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:  # the swept keys' columns after the fixed ones
        w = csv.DictWriter(f, fieldnames=COLUMNS + [k for k in (rows[0] if rows else {})
                                                    if k not in COLUMNS])
        w.writeheader()
        w.writerows(rows)
    return path


def over_seeds(rows: list[dict], pts: list[list[tuple[str, str]]]) -> list[dict]:
    """The runs of each point that differ in their seed alone, as one row: how many
    finished of how many, and their test accuracy's mean and standard deviation (one
    seed's noise can exceed the difference a restriction makes).  [] without a swept
    seed."""
    if not any(k == SEED for p in pts for k, _ in p):
        return []
    groups: dict[tuple[str, str], list[dict]] = {}
    for p, r in zip(pts, rows):
        groups.setdefault((r["rule"], restriction([kv for kv in p if kv[0] != SEED])),
                          []).append(r)
    out = []
    for (rule, restr), runs in groups.items():
        ok = [r for r in runs if finished(r)]
        acc = [r["test_accuracy"] for r in ok]
        out.append({"rule": rule, "restriction": restr, "seeds": f"{len(ok)}/{len(runs)}",
                    "mean": statistics.fmean(acc) if acc else math.nan,
                    "sd": statistics.stdev(acc) if len(acc) > 1 else math.nan,
                    "bits": statistics.fmean([r["error_bits_per_sample"] for r in ok])
                    if ok else math.nan,
                    "cos": statistics.fmean([r.get("error_cos", math.nan) for r in ok])
                    if ok else math.nan,
                    "wall_s": statistics.fmean([r["wall_s"] for r in ok]) if ok else math.nan,
                    # finished with huge logits: their mean is not a rule's accuracy at a
                    # stable rate, and a table of means alone would not show it
                    "huge": sum(1 for r in ok if r.get("loss_above_chance"))})
    return out


def _num(v: float, spec: str = ".4f") -> str:
    return "—" if math.isnan(v) else format(v, spec)  # a deviation of one seed: none


def write_md(rows: list[dict], path: Path, seeds: list[dict] | None = None,
             cost: list[dict] | None = None) -> Path:
    """Each run's row; first, with `seeds` (`over_seeds`), each point's over its seeds,
    and with `cost` (`costs`), what each --vary restriction costs."""
    lines = []
    if seeds:
        huge = any(g["huge"] for g in seeds)  # a column only where some run blew up
        lines += ["Over seeds (runs that finished / runs; the mean test accuracy and its "
                  "standard deviation" + ("; of the runs that finished, those whose loss "
                                          "ended above ln C: huge logits" if huge else "")
                  + "):", "",
                  "| rule | restriction | seeds | test accuracy | sd | error bits/sample | "
                  "error cos | wall s |" + (" huge logits |" if huge else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if huge else "")]
        lines += [f"| {g['rule']} | {g['restriction']} | {g['seeds']} | {g['mean']:.4f} | "
                  f"{_num(g['sd'])} | {g['bits']:.1f} | {_num(g['cos'], '.3f')} | "
                  f"{g['wall_s']:.1f} |"
                  + (f" {g['huge']} |" if huge else "") for g in seeds]
    if cost:
        lines += ([""] if lines else []) + costs_markdown(cost)
    if lines:
        lines += ["", "Each run:", ""]
    lines += ["| rule | restriction | test accuracy | test loss | error bits/sample | "
              "error cos | wall s | status |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['restriction']} | {r['test_accuracy']:.4f} | "
                     f"{_num(r['test_loss'])} | {r['error_bits_per_sample']:.1f} | "
                     f"{_num(r.get('error_cos', math.nan), '.3f')} | "
                     f"{r['wall_s']:.1f} | {r['status']} |")
    # an accuracy a little below its reference reads as a rule that learns a little
    # worse; these runs' logits grew huge instead
    huge = [r for r in rows if r.get("loss_above_chance")]
    if huge:
        lines += ["", "Runs whose loss was above ln C (the loss of an output that ignores its "
                  "input) at twice chance's accuracy or more: their logits grew huge.  A rate "
                  "past the largest at which the rule trains stably does this, and so can an "
                  "error channel that no lower rate mends:", ""]
        lines += [f"- {r['rule']}, {r['restriction']}: {r['loss_above_chance']}" for r in huge]
    kinds = cpu_kinds(rows, "point")
    if kinds:
        lines += ["", f"These runs ran on {len(kinds)} kinds of CPU, whose kernels round "
                  f"differently: the same point can end elsewhere on each, far apart where "
                  f"its logits blew up, so compare such points on one kind "
                  f"(benchmarks/RESULTS.md, \"the same command on two boxes\"):", ""]
        lines += [f"- {k}" for k in kinds]
    lines += ["", "error cos: the cosine between the error messages the senders made and what "
              "the receivers decoded, all of a run's taken as one (1: they arrive in their "
              "own direction; localnet/channels/README.md, \"What arrives of each message\")."]
    path.write_text("\n".join(lines) + "\n")
    return path


def costs(rows: list[dict], pts: list[list[tuple[str, str]]], vary_keys: list[str],
          same: dict | None = None) -> list[dict]:
    """One row per --vary restriction (a vary value, at the grid point it varies, its
    seeds pooled): {rule, against (the reference's settings, its seed left out),
    restriction (the vary setting), pairs ("finished pairs/pairs"), points_lost (the
    reference's test accuracy minus the restriction's, in points, averaged over the
    pairs), se (that mean's standard error; nan under two pairs), bits_ratio (error bits
    per sample over the reference's)}.  same: {a kept point's name: the grid point it
    also stands for}, as `sweep._one_run_each` gives it: a vary value that restates the
    config's own is its reference's run, and no restriction.  [] without --vary."""
    same = same or {}
    by_point = {tuple(p): r for p, r in zip(pts, rows)}
    by_name = {r["point"]: r for r in rows}
    for name, grid_point in same.items():
        by_point[tuple(grid_point)] = by_name[name]
    groups: dict[tuple, list] = {}
    for p, r in zip(pts, rows):
        varied = [kv for kv in p if kv[0] in vary_keys]
        if not varied or r["point"] in same:
            continue
        ref_point = [kv for kv in p if kv[0] not in vary_keys]
        ref = by_point.get(tuple(ref_point))
        key = (dict(ref_point).get("rule.name", r["rule"]),
               _text([kv for kv in ref_point if kv[0] not in ("rule.name", SEED)]),
               _text(varied))
        groups.setdefault(key, []).append((ref, r))
    out = []
    for (rule, against, restr), pairs in groups.items():
        ok = [(a, b) for a, b in pairs if finished(a) and finished(b)]
        lost = [100 * (a["test_accuracy"] - b["test_accuracy"]) for a, b in ok]
        ratio = [b["error_bits_per_sample"] / a["error_bits_per_sample"] for a, b in ok
                 if a["error_bits_per_sample"] > 0]  # (nan compares false: left out too)
        out.append({"rule": rule, "against": against, "restriction": restr,
                    "pairs": f"{len(ok)}/{len(pairs)}",
                    "points_lost": statistics.fmean(lost) if lost else math.nan,
                    "se": statistics.stdev(lost) / math.sqrt(len(lost)) if len(lost) > 1
                    else math.nan,
                    "bits_ratio": statistics.fmean(ratio) if ratio else math.nan,
                    # pairs with a run whose logits blew up: the points lost are then the
                    # rate's edge moving, not what the restriction takes away at a stable one
                    "huge": sum(1 for a, b in ok if a.get("loss_above_chance")
                                or b.get("loss_above_chance"))})
    return out


def costs_markdown(rows: list[dict]) -> list[str]:
    """sweep.md's lines for `costs`' rows.  The grid point a restriction varies gets a
    column only where some is not the config itself (a grid of more than rules and seeds)."""
    against = any(c["against"] != "none" for c in rows)
    huge = any(c.get("huge") for c in rows)
    return ["What each --vary restriction costs, paired by seed (its reference's test "
            "accuracy minus its own, in points, over the pairs that finished; se: that "
            "mean's standard error; bits: its error bits per sample over the reference's"
            + ("; huge logits: the pairs with a run whose loss ended above ln C" if huge
               else "") + "):",
            "", "| rule |" + (" against |" if against else "")
            + " restriction | pairs | points lost | se | bits |" + (" huge logits |" if huge
                                                                     else ""),
            "|---|" + ("---|" if against else "") + "---|---:|---:|---:|---:|"
            + ("---:|" if huge else "")] + [
        f"| {c['rule']} |" + (f" {c['against']} |" if against else "")
        + f" {c['restriction']} | {c['pairs']} | "
        f"{_num(c['points_lost'], '+.2f')} | {_num(c['se'], '.2f')} | "
        f"{_num(c['bits_ratio'], '.3f')} |" + (f" {c['huge']} |" if huge else "") for c in rows]


def write_tables(rows: list[dict], pts: list[list[tuple[str, str]]], out: Path,
                 same: dict, vary_keys: list[str]) -> tuple[list[Path], list[dict], list[dict]]:
    """sweep.csv, sweep.md, sweep_seeds.csv and sweep_costs.csv in `out`; returns the files
    written, `over_seeds`' rows and `costs`' rows."""
    seeds, cost = over_seeds(rows, pts), costs(rows, pts, vary_keys, same)
    files = [write_csv(rows, out / "sweep.csv"), write_md(rows, out / "sweep.md", seeds, cost)]
    # the means and costs a plotting tool reads, beside each run's row in sweep.csv; an
    # earlier sweep's in this directory are not these points'
    for table, name in ((seeds, "sweep_seeds.csv"), (cost, "sweep_costs.csv")):
        if table:
            with open(out / name, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(table[0]))
                w.writeheader()
                w.writerows(table)
            files.append(out / name)
        else:
            (out / name).unlink(missing_ok=True)
    return files, seeds, cost
