"""`localnet sweep`: one run per grid point, sequentially, then a table and a plot.

    localnet sweep CONFIG --grid rule.name=fa,pfa,kp --grid channel.error.codec=fp32,int8,sign
                   [--vary channel.error.delay=1,4 --vary channel.error.drop=0.1,0.5]
                   [--set KEY=VALUE ...] [--out DIR] [--jobs N | --ray]

The points are the cartesian product of the --grid lists (a list or map in brackets is one
value: --grid 'model.widths=[64],[64,64]'); each --vary list adds, for every product point,
one point per value with only that key changed (so rules x codecs, plus each of those with
each delay, plus each with each drop: not delays x drops).  A vary value that restates the
config's own is its product point's run, named after it.  Each point is an ordinary run
directory under the sweep directory, named after its settings.  A point whose run
directory already holds a summary.json is not run again, and one holding only a checkpoint
goes on from it, so rerunning the same command (same --out) resumes; a point's directory
that ran another config is an error naming the keys that differ.
Every point runs with `channel.enabled=true` (unless --set/--grid says otherwise), so even
an unrestricted fp32 point reports its error bits per sample.

Writes into the sweep directory: sweep.csv, sweep.md (rule, restriction, test accuracy,
error bits per sample, wall time) and sweep.png (accuracy against error bits per sample,
a colour per rule, and against each swept key: localnet/sweep_plot.py).  A swept `seed`
(--grid seed=0,1,2) makes replicates: sweep.md first gives each point's mean and standard
deviation over its seeds (sweep_seeds.csv holds them too), and sweep.png draws them.
With --vary, sweep.md also gives what each restriction costs against its reference,
paired by seed (sweep_costs.csv holds it too: localnet/sweep_tables.py).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

from .config import ConfigError, load_config, value_at
from .files import LOCK, counted, first_few, run_lock
from .sweep_plot import write_png
from .sweep_tables import restriction, write_tables
from .timing import cpu_label


def parse_grid(items: list[str], flag: str = "--grid") -> list[tuple[str, list[str]]]:
    """['rule.name=fa,kp'] -> [('rule.name', ['fa', 'kp'])]; values stay text (YAML-parsed
    by the config loader like --set)."""
    grid = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} expects key=v1,v2,..., got {item!r}")
        key, raw = item.split("=", 1)
        values = [v.strip() for v in _top_level_split(raw) if v.strip()]
        if not key.strip() or not values:
            raise ConfigError(f"{flag} {item!r}: needs a key and at least one value")
        grid.append((key.strip(), values))
    return grid


def _top_level_split(raw: str) -> list[str]:
    """Split at the commas outside brackets and quotes, so that a list or a map is one
    value: 'model.widths=[16,16],[32]' sweeps two widths, not '[16' and '16]'."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(raw):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)  # an unbalanced one: YAML names it, value by value
        elif ch == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    return parts + [raw[start:]]


def points(grid: list[tuple[str, list[str]]],
           vary: list[tuple[str, list[str]]] | None = None) -> list[list[tuple[str, str]]]:
    """The cartesian product of the grid axes; with `vary` axes, each product point, then
    that point once per value of each vary axis (one restriction at a time, the rest at
    the config's): the reference each restriction is read against comes with it."""
    keys = [k for k, _ in grid]
    base = [list(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]
    return [q for b in base for q in [b] + [b + [(k, v)] for k, values in vary or []
                                            for v in values]]


def _one_run_each(pts: list, cfgs: list) -> tuple[list, list, dict]:
    """Points whose configs are one and the same run once.  A vary value that restates the
    config's own (`--vary channel.error.codec=fp32,int8` on an fp32 config) is its grid
    point's run, kept under the name that says it; two points of equal standing (`--grid
    channel.error.drop=0.5,.5`) are refused, as running one thing twice.  Also returns
    {kept point's name: the grid point it stands for}, for the plot's references."""
    from .config import dump_config

    kept: dict[str, int] = {}  # config text -> the index of the point that runs it
    same = {}
    for i, cfg in enumerate(cfgs):
        text = dump_config(cfg)
        j = kept.setdefault(text, i)
        if j != i:
            if len(pts[j]) == len(pts[i]):
                raise ConfigError(f"sweep: {point_name(pts[j])} and {point_name(pts[i])} are "
                                  f"the same run (the same config); give one of them")
            if len(pts[i]) > len(pts[j]):
                kept[text], same[point_name(pts[i])] = i, pts[j]
    order = sorted(kept.values())
    return [pts[i] for i in order], [cfgs[i] for i in order], same


def _run_point(cfg, run_dir: Path) -> tuple[dict, str]:
    """One point (also in a worker process): its summary and status.  A point an earlier
    sweep left unfinished goes on from its last checkpoint (`sweep` checked that it ran
    this same config)."""
    from .train import NonFiniteLossError, train

    try:
        return train(cfg, run_dir, resume=(run_dir / "checkpoint.pt").exists(),
                     progress=False), "ok"
    except NonFiniteLossError as exc:  # a result of the sweep (too high a rate), not a fault
        return {}, f"diverged at step {exc.step} (NaN or inf; {run_dir.name}/stopped.json)"
    except Exception as exc:  # one bad point must not lose the others
        return {}, f"failed: {type(exc).__name__}: {exc}"


def _same_config(run_dir: Path, cfg) -> None:
    """A point's directory from an earlier sweep is reused (skipped when finished, resumed
    when not) only if it ran this point's config; otherwise its results would be reported
    under settings they were not run with."""
    import yaml

    from .config import config_diff, dump_config, read_recorded

    f = run_dir / "config.yaml"
    if not f.exists():
        return
    there = yaml.safe_load(f.read_text()) or {}
    recorded = read_recorded(there)  # (a codec's option added since: at its default)
    if recorded is not None:
        there = yaml.safe_load(dump_config(recorded))
    # (a recipe counts by the values it set, compared as the others; how it is written
    # changed once: it now holds the values a --set beat it with)
    diff = [d for d in config_diff(there, yaml.safe_load(dump_config(cfg)))
            if not d[0].startswith("per_rule.")]
    if diff:
        shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:3])
        raise ConfigError(f"sweep: {run_dir} was run with another config ({shown}"
                          f"{', ...' if len(diff) > 3 else ''}); give another --out, or "
                          f"remove that point's directory to run it again")


def _each_key_once(grid, vary, sets: list[str]) -> None:
    """A key swept twice, a value given twice, or a key both set and swept would run
    points whose settings are not what their names say (the last of them wins), or the
    same point twice into one directory: refused, naming the key."""
    seen: dict[str, str] = {}
    for flag, axes in (("--grid", grid), ("--vary", vary)):
        for key, values in axes:
            if key in seen:
                raise ConfigError(f"sweep: {key} is swept twice ({seen[key]} and {flag}); "
                                  f"give its values in one list")
            seen[key] = flag
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ConfigError(f"{flag} {key}: {', '.join(twice)} given twice; each value "
                                  f"is one point")
            # values a directory name cannot tell apart ('[16, 16]' and '[16,16]') would
            # run into one point's directory
            named: dict[str, str] = {}
            for v in values:
                other = named.setdefault(point_name([(key, v)]), v)
                if other != v:
                    raise ConfigError(f"{flag} {key}: {other} and {v} would share one point's "
                                      f"directory, {point_name([(key, v)])}; give one of them")
    for item in sets:
        key = item.split("=", 1)[0].strip()
        if key in seen:
            raise ConfigError(f"sweep: {key} is both --set and swept ({seen[key]}), and the "
                              f"swept values would win; give it once")


def point_name(point: list[tuple[str, str]]) -> str:
    # the point of no keys: the config as it is, the reference of a sweep of --vary alone
    # (a name of "" would be the sweep's own directory)
    text = "__".join(f"{k}-{v}" for k, v in point) or "reference"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _run_on_ray(todo, out: Path, runtime, log) -> dict[str, tuple[dict, str]]:
    """Every point as a Ray task (num_cpus = its train.threads, at least 1), so the
    cluster runs as many at once as it has room for.  The run directories must be on a
    filesystem the nodes share (they are written by the tasks)."""
    from .runtime.session import run_tasks

    # absolute: a task's working directory is its worker's, not this command's
    jobs = [(name, (cfg, (out / name).absolute()), max(1, cfg.train.threads or 1))
            for name, cfg in todo]
    return run_tasks(_run_point, jobs, runtime, log=log,
                     failed=lambda exc: ({}, f"failed: {type(exc).__name__}: {exc}"))


def sweep(config: str | Path | None, grid_items: list[str], sets: list[str] | None = None,
          out: str | Path | None = None, log=print, vary_items: list[str] | None = None,
          jobs: int = 1, use_ray: bool = False, started=None, dry_run: bool = False) -> dict:
    """Run (or resume) the sweep; returns {"dir", "rows", "files", "ran" (the points run
    to their end this time), "diverged", "failed", "skipped", "over_seeds" (each point's
    mean over a swept seed: `over_seeds`)}.
    jobs > 1: that many points at once, each in its own process (give each run
    `train.threads` so that jobs x threads fits the machine).  use_ray: every point a
    Ray task on the cluster (runtime.address / $RAY_ADDRESS, else a local Ray), as many
    at once as the cluster has CPUs for.  started(dir): called once the sweep directory
    is known (a stopped sweep goes on when rerun with --out it).  dry_run: check every
    point's config (and the data, and an --out's earlier points), run and write nothing;
    returns {"dir", "points": [(name, what a run would do with it)]}."""
    sets = list(sets or [])
    grid, vary = parse_grid(grid_items), parse_grid(vary_items or [], "--vary")
    if not grid and not vary:  # (the product of no axes is one point: the config itself)
        raise ConfigError("sweep: nothing to sweep: give --grid and/or --vary (one run of "
                          "the config as it is: localnet run CONFIG)")
    _each_key_once(grid, vary, sets)
    pts = points(grid, vary)
    keys = [k for k, _ in grid + vary]
    forced = [] if any(s.split("=", 1)[0].strip() == "channel.enabled" for s in sets) or \
        "channel.enabled" in keys else ["channel.enabled=true"]
    cfgs = [load_config(config, forced + sets + [f"{k}={v}" for k, v in p]) for p in pts]
    pts, cfgs, same = _one_run_each(pts, cfgs)
    if not use_ray:  # (a Ray task reads its data on its own node, which may have it)
        _data_is_there(cfgs)
    if dry_run:
        return {"dir": out or Path(cfgs[0].out_dir) / "sweep-<time>",
                "points": _plan(pts, cfgs, Path(out) if out else None)}
    if out is None:
        out = Path(cfgs[0].out_dir) / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    _refuse_others_in(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"sweep: --out {out}: a file is in the way (it names the sweep's "
                          f"directory)") from None
    if started:
        started(out)
    # two sweeps in one directory would run the same points twice and write each other's
    # tables; the second is refused (each point's run holds its own directory as well)
    with run_lock(out, "sweep", "run this command again: it goes on with the points that "
                                "did not finish"):
        return _sweep(pts, cfgs, out, log, jobs, use_ray, same, [k for k, _ in vary])


def _data_is_there(cfgs) -> None:
    """A missing dataset is said once, before any point: each point would otherwise fail
    on it in turn, with the same lines."""
    from .data import find_data

    for where in dict.fromkeys((c.data.name, c.data.root, c.data.download) for c in cfgs):
        find_data(*where)


def _plan(pts, cfgs, out: Path | None) -> list[tuple[str, str]]:
    """What a run of the sweep would do with each point: run it, go on from its
    checkpoint, or skip it, finished (an --out of an earlier sweep)."""
    if out is None:  # a new directory
        return [(point_name(p), "to run") for p in pts]
    _refuse_others_in(out)
    plan = []
    for p, cfg in zip(pts, cfgs):
        run_dir = out / point_name(p)
        _same_config(run_dir, cfg)
        plan.append((run_dir.name, "finished: skipped" if (run_dir / "summary.json").exists()
                     else "goes on from its checkpoint" if (run_dir / "checkpoint.pt").exists()
                     else "to run"))
    return plan


# and `report/`, where `localnet report SWEEP_DIR` puts its plots
_TABLES = ("sweep.csv", "sweep_seeds.csv", "sweep_costs.csv", "sweep.md", "sweep.png", LOCK,
           "report")


def _refuse_others_in(out: Path) -> None:
    """A sweep writes its tables over any `sweep.csv` there and its points' runs beside
    whatever else is there (`--out .`, a data folder), so it goes into a new or empty
    directory, or one a sweep made: its tables, and points' runs (each holding the
    config.yaml its run wrote first, or nothing yet)."""
    if not out.is_dir():
        return
    others = sorted(f.name for f in out.iterdir() if f.name not in _TABLES and
                    not f.name.startswith(".") and  # NFS's .nfs* of files still open
                    not (f.is_dir() and ((f / "config.yaml").is_file() or
                                         not any(f.iterdir()))))
    if others:
        raise ConfigError(f"sweep: --out {out} holds other files ({first_few(others)}): a "
                          f"sweep goes into a new or empty directory, or one a sweep made; "
                          f"give another --out")


def _sweep(pts, cfgs, out: Path, log, jobs: int, use_ray: bool, same: dict,
           vary_keys: list[str]) -> dict:
    results: dict[str, tuple[dict, str]] = {}
    skipped, todo = [], []
    count = [0]  # points settled so far, for the [sweep k/N] lines

    def ended(name: str, result: tuple[dict, str]) -> None:
        count[0] += 1
        summary, status = result
        if status == "ok" and "test_accuracy" in summary:
            status = f"ok, test accuracy {summary['test_accuracy']:.4f} in {summary['wall_s']:.0f} s"
        log(f"[sweep {count[0]}/{len(pts)}] {name}: {status}")

    for p, cfg in zip(pts, cfgs):
        name = point_name(p)
        _same_config(out / name, cfg)
        done = out / name / "summary.json"
        if done.exists():
            skipped.append(name)
            results[name] = (json.loads(done.read_text()), "ok")
            ended(name, ({}, "done already, skipped"))
        else:
            todo.append((name, cfg))
    if use_ray and todo:
        log(f"[sweep] {counted(len(todo), 'point')} to run as Ray tasks, as many at once as "
            f"the cluster has CPUs for")  # the first line otherwise comes when the first point ends
        results.update(_run_on_ray(todo, out, cfgs[0].runtime, ended))
    elif jobs > 1 and len(todo) > 1:
        log(f"[sweep] {len(todo)} points to run, {min(jobs, len(todo))} at a time")
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_run_point, cfg, out / name): name for name, cfg in todo}
            for fut in as_completed(futs):
                name = futs[fut]
                try:
                    results[name] = fut.result()
                except BrokenProcessPool:
                    # a point's process killed (kill -9, the out-of-memory killer): the pool
                    # ends every point still in it (it may notice only when another point
                    # ends), and which one died is not known; those that finished are kept,
                    # and a rerun goes on with the rest
                    results[name] = ({}, "failed: a point's process ended abruptly "
                                         "(killed, or out of memory?); run the sweep again "
                                         "to go on")
                ended(name, results[name])
    else:
        for name, cfg in todo:
            log(f"[sweep {count[0] + 1}/{len(pts)}] {name}: running")
            results[name] = _run_point(cfg, out / name)
            ended(name, results[name])
    ran = [n for n, _ in todo if results[n][1] == "ok"]
    diverged = [n for n, _ in todo if results[n][1].startswith("diverged")]
    failed = [n for n, _ in todo if n not in ran and n not in diverged]
    rows = []
    swept = list(dict.fromkeys(k for p in pts for k, _ in p if k != "rule.name"))
    for p, cfg in zip(pts, cfgs):
        name = point_name(p)
        summary, status = results[name]
        ch = summary.get("channels") or {}
        rows.append({"rule": summary.get("rule", cfg.rule.name), "restriction": restriction(p),
                     "test_accuracy": summary.get("test_accuracy", float("nan")),
                     "test_loss": summary.get("test_loss", float("nan")),
                     "error_bits_per_sample": ch.get("error_bits_per_sample", float("nan")),
                     "error_cos": _or_nan(ch.get("error_cos")),
                     "error_rest": _or_nan(ch.get("error_rest")),
                     "wall_s": summary.get("wall_s", float("nan")), "status": status,
                     "point": name, "loss_above_chance": _above_chance(summary),
                     "cpu": cpu_label(summary.get("cpu")),
                     **_settings(p, cfg, swept)})
    files, seeds, cost = write_tables(rows, pts, out, same, vary_keys)
    files.append(write_png(rows, pts, out / "sweep.png", same, cost))
    return {"dir": out, "rows": rows, "files": files, "ran": ran, "diverged": diverged,
            "failed": failed, "skipped": skipped, "over_seeds": seeds, "costs": cost}


def _or_nan(v) -> float:
    return float("nan") if v is None else float(v)  # (a run from before it was measured)


def _above_chance(summary: dict) -> str:
    """Where the run's losses were above ln C at twice chance's accuracy (train.py,
    `above_chance`), as sweep.csv's text: its logits grew huge, which its accuracy alone
    does not show.  Empty where they were not."""
    b = summary.get("loss_above_chance")
    return (f"epoch {b['epoch']}: {b['on']} loss {b['loss']:.4g} > ln C = {b['chance_loss']:.4g} "
            f"at accuracy {b['accuracy']:.4f}") if b else ""


def _settings(point: list[tuple[str, str]], cfg, swept: list[str]) -> dict:
    """Each swept key's value at this point, as given, or the config's where the point
    leaves it (a --vary point's other keys): a column each in sweep.csv, so a table tool
    can group and filter by them without parsing the restriction."""
    given, data = dict(point), cfg.model_dump(mode="json")
    out = {}
    for key in swept:
        if key in given:
            out[key] = given[key]
            continue
        try:
            value = value_at(data, key)
        except (KeyError, TypeError):  # an option that this point's rule or codec lacks
            value = ""
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out
