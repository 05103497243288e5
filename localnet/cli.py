"""`localnet` command line: run, validate, simulate, report, sweep, rules."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .cli_run import cmd_run, sigterm_stops, stopped_by
from .config import ConfigError, dump_config, load_config
from .data import DatasetError
from .files import counted
from .runs import RunDirError


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"localnet {of('localnet')} (torch {of('torch')}, ray {of('ray')}, "
            f"Python {sys.version.split()[0]})")


class _Version(argparse.Action):
    """--version, looked up only when asked for (every other command skips the package
    metadata reads)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(_versions())
        parser.exit()


def _cmd_validate(args) -> int:
    cfg = load_config(args.config, args.set)
    if args.print:
        print(dump_config(cfg), end="")
    else:
        from .runtime.plan import check_partition

        actors, mem = check_partition(cfg, memory_too=True)
        mem = mem if cfg.runtime.executor == "ray" else None  # local: one process
        where = ""
        if actors and cfg.runtime.executor != "inprocess":
            where = f"; runtime.partition makes {counted(actors, 'actor')}"
        if mem:
            where += f", about {mem['total_mb']} MB in all"
            _fits_this_machine(cfg, actors, mem)
        print(f"{args.config}: ok ({cfg.rule.name} / {cfg.model.name} / {cfg.data.name}{where})")
        _machine_notes(cfg)
    return 0


def _machine_notes(cfg) -> None:
    """The data and the in-process GPU are the machine's, not the config's: where this
    one lacks them, say so (a run here would stop at once; the machine that runs it may
    well have them)."""
    from .data import DatasetNotFoundError, find_data
    from .train import train_device

    lacks = []
    try:
        find_data(cfg.data.name, cfg.data.root, cfg.data.download)
    except DatasetNotFoundError as err:
        lacks.append(str(err))
    if cfg.runtime.executor == "inprocess":
        try:
            train_device(cfg)
        except ConfigError as err:
            lacks.append(str(err))
    for what in lacks:
        print(f"localnet: note: on this machine, {what}\n(a `localnet run` here would stop at "
              f"its start; the machine that runs it needs what it lacks here)", file=sys.stderr)


STAGES_N = "'{stages: N}'"


def _fits_this_machine(cfg, actors: int, mem: dict) -> None:
    """An embedded Ray has this machine and no more: what its actors ask for in memory
    and GPUs is checked here, before a run finds out at placement."""
    from .runtime.memory import remedy
    from .runtime.session import cluster_address

    if cluster_address(cfg.runtime):
        return
    here = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    if mem["total_mb"] > here:
        raise ConfigError(
            f"runtime.partition makes {counted(actors, 'actor')}, estimated at "
            f"{mem['total_mb']} MB in all (the largest {mem['per_actor_mb_max']} MB), more "
            f"than this machine's {here} MB: the embedded Ray would refuse it.  "
            f"{remedy(mem, STAGES_N)} a cluster (runtime.address)")
    cpus, offered = actors * cfg.runtime.num_cpus, cfg.runtime.local_cpus
    if cpus > offered + 1e-9:  # (the run finds it out at placement, after Ray's start)
        raise ConfigError(
            f"runtime.num_cpus: {counted(actors, 'actor')} asking for "
            f"{cfg.runtime.num_cpus:g} CPU each need {cpus:g}; the embedded Ray offers "
            f"runtime.local_cpus={offered}.  Ask for less (runtime.num_cpus="
            f"{math.floor(offered / actors * 100) / 100:g}), use fewer actors ({STAGES_N}), "
            f"raise runtime.local_cpus, or use a cluster (runtime.address)")
    each = cfg.runtime.num_gpus
    if each:
        import torch

        gpus = torch.cuda.device_count()
        share = gpus / actors
        if share:  # rounded down, so that the shares fit
            unit = 10.0 ** (math.floor(math.log10(share)) - 2)
            share = math.floor(share / unit) * unit
        if actors * each > gpus + 1e-9:
            raise ConfigError(
                f"runtime.num_gpus: {counted(actors, 'actor')} asking for {each:g} GPU each need "
                f"{actors * each:g} GPUs; this machine has {gpus}, and the embedded Ray offers "
                f"only those.  Ask for a fraction (runtime.num_gpus={share:.3g} shares "
                f"them), use fewer actors ('{{stages: N}}'), or a cluster (runtime.address)"
                if gpus else
                f"runtime.num_gpus: {each:g} asked for each actor, but this machine has no GPU "
                f"that torch can see; leave runtime.num_gpus at 0 here, or use a cluster "
                f"(runtime.address)")


def _cmd_rules(args) -> int:
    from .rules import RULES

    table = Table(title="localnet learning rules")
    for col in ("name", "weight transport", "options (rule.*, default)", "paper"):
        table.add_column(col)
    for name, cls in RULES.items():
        table.add_row(name, "yes" if cls.transports_weights else "no", _options(cls.Options),
                      cls.paper)
    Console().print(table)
    return 0


def _options(model) -> str:
    """A plugin's Options as `key=default`; a nested section as `key.{a,b,...}`."""
    out = []
    for key, field in model.model_fields.items():
        sub = getattr(field.default, "model_fields", None)
        out.append(f"{key}.{{{','.join(sub)}}}" if sub else f"{key}={field.default}")
    return ", ".join(out) or "-"


def _numbers(text: str, option: str, kind=float, n: int | None = None) -> list:
    """An option's comma-separated numbers; a bad one is an error naming the option."""
    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    # (nan passes a comparison with 0 either way; inf makes every timing inf)
    if not vals or (n and len(vals) != n) or not all(kind is int or math.isfinite(v)
                                                   for v in vals) or min(vals) < (kind is int):
        raise ConfigError(f"{option}: expected {n or 'one or more'} "
                          f"{'positive' if kind is int else 'non-negative'} "
                          f"{kind.__name__}s separated by commas, got {text!r}")
    return vals


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds >= 0."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return v


def _count(text: str) -> int:
    """argparse type: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _cmd_simulate(args) -> int:
    from .runtime.plan import run_costs, simulate_config

    cfg = load_config(args.config, args.set)
    if args.plot and not Path(args.plot).resolve().parent.is_dir():  # before any timing
        raise ConfigError(f"--plot {args.plot}: no directory {Path(args.plot).parent} to "
                          f"write it in")
    if bool(args.fwd) != bool(args.bwd):  # half given, half measured: neither one's plan
        raise ConfigError(f"{'--bwd' if args.fwd else '--fwd'}: give it beside "
                          f"{'--fwd' if args.fwd else '--bwd'} (or neither: both are then "
                          f"measured in-process)")
    costs = run_costs(args.costs_from) if args.costs_from else None
    shape = tuple(_numbers(args.input_shape, "--input-shape (C,H,W)", int, 3)) \
        if args.input_shape else None
    plan = simulate_config(cfg, shape, args.num_classes,
                           _numbers(args.fwd, "--fwd") if args.fwd else None,
                           _numbers(args.bwd, "--bwd") if args.bwd else None, args.comm, args.repeats,
                           cores=args.cores, hop_cost=args.hop_cost,
                           call_cost=args.call_cost, hop_cost_per_mib=args.hop_cost_per_mib,
                           costs=costs)
    if args.plot:
        from .report_plots import plot_timeline  # matplotlib only when asked for

        plot_timeline(plan, Path(args.plot))
    if args.json:
        print(json.dumps(plan))
        return 0
    table = Table(title=f"{plan['schedule']}: {counted(plan['stages'], 'stage')} x "
                        f"{counted(plan['micro_batches'], 'micro-batch')} "
                        f"({plan['cost_source']} costs, ms per micro-batch)",
                  caption="stashed: the most micro-batches whose inputs a stage holds at once, "
                          "for their backward")
    for col in ("stage", "units", "fwd ms", "bwd ms", "busy ms", "stashed"):
        table.add_column(col, justify="left" if col == "units" else "right",
                         no_wrap=col != "units")
    for st in plan["per_stage"]:
        units = st["units"] if len(st["units"]) <= 3 else st["units"][:1] + ["..."] + st["units"][-1:]
        table.add_row(str(st["stage"]), " ".join(units), f"{st['fwd_s'] * 1e3:.3f}",
                      f"{st['bwd_s'] * 1e3:.3f}", f"{st['busy_s'] * 1e3:.3f}",
                      str(st["peak_activations"]))
    Console().print(table)
    print(f"makespan: {plan['makespan_s'] * 1e3:.3f} ms per batch of {plan['batch_size']}")
    print(f"bubble fraction: {plan['bubble_fraction']:.4f} "
          f"(gpipe with equal costs: {plan['gpipe_equal_cost_bubble']:.4f})")
    if plan["balance_hint"]:
        print(f"hint: {plan['balance_hint']}")
    rate = plan["samples_per_s"]  # None where every cost is 0 (--fwd 0,... --bwd 0,...)
    rate = "unbounded, a batch taking no time" if rate is None else f"{rate:.1f}"
    print(f"predicted samples/s: {rate}"
          + (f" ({counted(plan['cores'], 'core')}" if plan["cores"]
             else " (a core per actor")
          + (f", {plan['hop_cost_s'] * 1e3:.3f} ms CPU per hop + "
             f"{plan['hop_cost_per_mib_s'] * 1e3:.3f} ms per MiB, "
             f"{plan['call_cost_s'] * 1e3:.2f} ms per coordinator call)"
             if plan["hop_cost_s"] or plan["call_cost_s"] or plan["hop_cost_per_mib_s"]
             else ", no runtime overhead: --costs-from RUN_DIR adds what a run's messages "
                  "cost its machine)"))
    cf = plan["costs_from"]
    if cf:
        scale = (f"; its actors' compute {cf['compute_scale']:.2f}x the units measured now"
                 if cf["compute_scale"] is not None else "")
        print(f"costs from {cf['run']}: {cf['hop_cost_s'] * 1e3:.3f} ms of the machine's CPU "
              f"per message between actors ({cf['messages_per_batch']} a batch: all it spent "
              f"beyond its actors' compute){scale}")
        if cf["same_plan"] and cf["samples_per_s"]:
            print(f"that run trained at {cf['samples_per_s']:.1f} samples/s")
    per_call = plan.get("batches_per_call", 1)
    print(f"coordinator calls per batch: {plan['calls_per_batch']:g} (one per actor"
          + (f" per {per_call} batches)" if per_call > 1 else ")")
          + (f"; each batch issued {plan['batches_ahead']} ahead of the loss it waits for"
             if plan.get("batches_ahead") else ""))
    m = plan["memory_estimate"]
    print(f"memory estimate: {m['total_mb']} MB for {counted(m['actors'], 'actor')} (the largest "
          f"{m['per_actor_mb_max']} MB; process floor {m['baseline_mb']} MB each, "
          f"runtime.actor_baseline_mb)")
    if args.plot:
        print(f"timeline: {args.plot}")
    return 0


def _cmd_report(args) -> int:
    from .report import report, table  # matplotlib only when needed

    res = report(args.run_dirs, args.out)
    if args.json:
        print(json.dumps({"files": res["files"], "rows": res["rows"], "skipped": res["skipped"],
                          "notes": res["notes"]}))
        return 0
    console = Console()
    console.print(table(res["runs"]))
    for f in res["files"]:  # unwrapped: a path split over two lines cannot be copied
        console.print(f"wrote {f}", soft_wrap=True, markup=False)
    for name, what in res["notes"].items():
        console.print(f"[dim]{name}: {what}[/]")
    for name, why in res["skipped"].items():
        console.print(f"[dim]no {name}: {why}[/]")
    return 0


@sigterm_stops
def _cmd_sweep(args) -> int:
    from .sweep import sweep

    where: list[Path] = []
    say = lambda m: Console(stderr=True).print(m, markup=False, soft_wrap=True)  # noqa: E731
    try:
        res = sweep(args.config, args.grid, args.set, args.out, log=say,
                    vary_items=args.vary, jobs=args.jobs, use_ray=args.ray,
                    started=lambda d: (where.append(d), say(f"sweep directory: {d}")),
                    dry_run=args.dry_run)
    except KeyboardInterrupt as exc:
        if not where:
            raise
        said, code = stopped_by(exc)
        # the finished points are kept; the one running goes on from its checkpoint
        print(f"localnet: {said}; the points that ended are kept.  Go on with: "
              f"{shlex.join(['localnet', *_without_out(args.argv), '--out', str(where[0])])}",
              file=sys.stderr)
        return code
    if args.dry_run:
        for name, what in res["points"]:
            print(f"{name}: {what}")
        todo = sum(what != "finished: skipped" for _, what in res["points"])
        print(f"{counted(len(res['points']), 'point')}, {todo} to run, in {res['dir']}; "
              f"nothing was run (--dry-run)")
        return 0
    print((res["dir"] / "sweep.md").read_text(), end="")
    # every point run this time counts, and those that did not finish say how they ended
    ended = [f"{len(res[k])} {k}" for k in ("diverged", "failed") if res[k]]
    ran = len(res["ran"]) + len(res["diverged"]) + len(res["failed"])
    how = f" ({', '.join(ended)})" if ended else ""
    print(f"sweep directory: {res['dir']} (ran {ran}{how}, skipped {len(res['skipped'])} "
          f"finished)")
    # a diverged point is a finding of the sweep (too high a rate), not a failure of it
    return 0 if all(r["status"] == "ok" or r["status"].startswith("diverged")
                    for r in res["rows"]) else 1


def _without_out(argv: list[str]) -> list[str]:
    """A command line less its --out DIR (or --out=DIR)."""
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--out="):
            skip = False
        elif a == "--out":
            skip = True
        else:
            out.append(a)
    return out


SET_HELP = "override a config key, e.g. --set rule.name=fa (repeatable)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localnet", description=__doc__)
    p.add_argument("--version", action=_Version, nargs=0,
                   help="localnet's version and its engines' (for a bug report)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train a model per a config")
    r.add_argument("config", nargs="?", help="YAML config (not needed with --resume)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    r.add_argument("--out", help="run directory (default: <out_dir>/<name>-<time>)")
    r.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its checkpoint (with its own config.yaml; --set "
                        "may change train.epochs, or runtime.partition / runtime.executor: "
                        "the checkpoint is re-cut)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a config; non-zero exit names the bad key")
    v.add_argument("config", help="YAML config")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    v.add_argument("--print", action="store_true", help="print the resolved config")
    v.set_defaults(func=_cmd_validate)

    si = sub.add_parser("simulate", help="predict the pipeline's bubble fraction and samples/s "
                                         "(runtime.schedule / runtime.partition), no Ray")
    si.add_argument("config", help="YAML config")
    si.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    si.add_argument("--fwd", metavar="S0,S1,...", help="forward seconds per micro-batch per stage "
                                                     "(default: measured in-process)")
    si.add_argument("--bwd", metavar="S0,S1,...", help="backward seconds per micro-batch per stage")
    si.add_argument("--comm", type=_seconds, default=0.0, help="seconds per cross-stage message")
    si.add_argument("--cores", type=_count, default=None,
                    help="the actors share this many cores (default: one core each)")
    si.add_argument("--hop-cost", type=_seconds, default=0.0, metavar="S",
                    help="seconds of CPU per message between actors on the data plane "
                         "(benchmarks/dataplane.py measures it)")
    si.add_argument("--hop-cost-per-mib", type=_seconds, default=0.0, metavar="S",
                    help="seconds of CPU per MiB of a message's payload, on top of "
                         "--hop-cost (benchmarks/dataplane.py: the 4 KiB and 4 MiB rows)")
    si.add_argument("--call-cost", type=_seconds, default=0.0, metavar="S",
                    help="seconds of CPU per coordinator call (one per actor per batch)")
    si.add_argument("--costs-from", metavar="RUN_DIR",
                    help="a finished Ray run on this machine: its cores, what each message "
                         "between its actors cost the machine, and its compute, for "
                         "predicting this config (another partition or schedule) there")
    si.add_argument("--input-shape", metavar="C,H,W", help="skip loading data: the input shape")
    si.add_argument("--num-classes", type=_count, help="skip loading data: the class count")
    si.add_argument("--repeats", type=_count, default=3, help="timed repeats per unit")
    si.add_argument("--json", action="store_true", help="print the plan as JSON")
    si.add_argument("--plot", metavar="PNG", help="also draw the simulated schedule there: "
                                                  "a row per actor, a bar per action")
    si.set_defaults(func=_cmd_simulate)

    rp = sub.add_parser("report", help="plots (curves, alignment, message bytes per edge) "
                                       "of one or more run directories, and a table")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", help="output directory (default: RUN_DIR/report for one run, "
                                  "./report for several)")
    rp.add_argument("--json", action="store_true", help="print files and table rows as JSON")
    rp.set_defaults(func=_cmd_report)

    sw = sub.add_parser("sweep", help="one run per grid point (resumable), then sweep.csv, "
                                      "sweep.md and sweep.png (accuracy vs error bits/sample, "
                                      "and vs each swept key)")
    sw.add_argument("config", help="YAML config: every point's keys but the swept ones")
    sw.add_argument("--grid", action="append", default=[],
                    metavar="KEY=V1,V2,...", help="a swept key, e.g. channel.error.codec=fp32,"
                                                   "int8,sign (repeatable: cartesian product; "
                                                   "a list or map in brackets is one value; "
                                                   "seed=0,1,2 makes replicates: their mean "
                                                   "and sd)")
    sw.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="one restriction at a time: each value is one more point per grid "
                         "point, with only this key changed (repeatable); sweep.md says "
                         "what each costs against its grid point, paired by seed")
    at_once = sw.add_mutually_exclusive_group()  # each would be ignored beside the other
    at_once.add_argument("--jobs", type=_count, default=1, help="points run at once, each in "
                                                             "its own process (default 1)")
    at_once.add_argument("--ray", action="store_true",
                    help="run every point as a Ray task (runtime.address / RAY_ADDRESS, else "
                         "a local Ray): as many at once as the cluster has CPUs for")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    sw.add_argument("--out", help="sweep directory (default: <out_dir>/sweep-<time>); "
                                  "rerun with the same --out to resume")
    sw.add_argument("--dry-run", action="store_true",
                    help="check every point's config and the data, list the points and "
                         "what a run would do with each (with --out: which are finished); "
                         "run and write nothing")
    sw.set_defaults(func=_cmd_sweep)

    ru = sub.add_parser("rules", help="list the learning rules and their papers")
    ru.set_defaults(func=_cmd_rules)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to say a command again
    if getattr(args, "command", None) == "run" and not args.config and not args.resume:
        parser().error("run: give a CONFIG or --resume RUN_DIR")
    if getattr(args, "command", None) == "run" and args.resume and (args.config or args.out):
        # either would be ignored, and a run resumed under a config the user did not mean
        parser().error(f"run: --resume {args.resume} goes on with that run's own config.yaml, "
                       f"in its own directory: give no "
                       + (f"CONFIG ({args.config}); --set what should change"
                          if args.config else f"--out ({args.out})"))
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, DatasetError, RunDirError) as exc:
        # a config, a path, data or a run's file to fix; the message names it
        print(f"localnet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("localnet: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, MemoryError) as exc:
        # a divergence, a bad message (names the edge and step), a dead actor after its
        # recoveries, a silent peer: the run's saved work stays in its run directory.  Our
        # own errors' messages say what happened; another library's need its class read.
        ours = type(exc).__module__.startswith("localnet.")
        _say(f"{'' if ours else type(exc).__name__ + ': '}{exc}", exc)
        return 1
    except OSError as exc:  # the machine's, not ours: a full disk, a read-only mount
        _say(str(exc), exc)
        return 1
    except Exception as exc:  # a bug: one line for the user, the traceback kept for a report
        if os.environ.get("LOCALNET_DEBUG"):
            raise
        with tempfile.NamedTemporaryFile("w", prefix="localnet-error-", suffix=".txt",
                                         delete=False) as f:
            f.write(f"{_versions()}\n{' '.join(sys.argv)}\n\n")  # what a report needs
            traceback.print_exc(file=f)
        _say(f"unexpected {type(exc).__name__}: {exc}\n(a bug in localnet: the traceback is in "
             f"{f.name}; LOCALNET_DEBUG=1 prints it)", exc)
        return 1


def _say(line: str, exc: BaseException) -> None:
    """An error for the user, and what `run` added to it (where its saved work is)."""
    print(f"localnet: {line}", file=sys.stderr)
    for note in getattr(exc, "__notes__", ()):
        print(f"localnet: {note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
