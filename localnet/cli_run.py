"""`localnet run`: starting a run, and how it stops -- Ctrl-C, SIGTERM, a failure --
without losing what it saved, and saying how it goes on."""

from __future__ import annotations

import functools
import json
import shutil
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .config import ConfigError, load_config, load_run_config
from .errors import DivergedError
from .files import RunInUseError, counted, first_few
from .watchdog import SIGTERM_SEEN, Watchdog


class Terminated(KeyboardInterrupt):
    """SIGTERM -- a scheduler's, `ray job stop`'s, a container's: the run stops as Ctrl-C
    stops it, its last checkpoint kept and --resume named (Python would exit at once)."""


def _on_sigterm(signum, frame):
    SIGTERM_SEEN.set()
    raise Terminated("SIGTERM")


def sigterm_stops(cmd):
    """The command stops on SIGTERM as on Ctrl-C (its own handler says what is kept)."""
    @functools.wraps(cmd)
    def run(args) -> int:
        if threading.current_thread() is not threading.main_thread():
            return cmd(args)  # only the main thread may set a handler
        before = signal.signal(signal.SIGTERM, _on_sigterm)
        SIGTERM_SEEN.clear()
        try:
            return cmd(args)
        finally:
            signal.signal(signal.SIGTERM, before)
    return run


def stopped_by(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped a command, in words, and its exit status (128 + the signal).  A
    handler that raises inside `ray.get` has its exception replaced: Ray's check of the
    signals turns any into a bare KeyboardInterrupt, so the flag says it was SIGTERM."""
    if isinstance(exc, Terminated) or SIGTERM_SEEN.is_set():
        return "terminated (SIGTERM)", 143
    return "interrupted", 130


@sigterm_stops
def cmd_run(args) -> int:
    from .train import new_run_dir, record_signal_stop, train  # torch only when needed

    if args.resume:
        run_dir = Path(args.resume)
        cfg, dropped = load_run_config(run_dir, args.set)
        if dropped:
            print(f"localnet: {run_dir / 'config.yaml'} was written by an earlier localnet, "
                  f"which kept every rule's and codec's options; dropped the ones this run's "
                  f"rule and codecs never used: {', '.join(dropped)}", file=sys.stderr)
        _same_divergence_ahead(run_dir, cfg)
    else:
        cfg = load_config(args.config, args.set)
        from .runtime.plan import check_partition

        check_partition(cfg)  # a partition the model cannot take leaves no run directory
        if args.out:
            _refuse_a_run_in(Path(args.out))
        fresh = not (args.out and Path(args.out).exists())
        made = _missing(Path(args.out).absolute().parent if args.out else
                        Path(cfg.out_dir).absolute())  # parents the run directory brings
        run_dir = new_run_dir(cfg, args.out)
    # the path whole and as given (a "[x]" in it is no markup): it is copied into --resume
    Console(stderr=True).print(f"[bold]localnet[/] {cfg.rule.name} / {cfg.model.name} / "
                               f"{cfg.data.name} -> {escape(str(run_dir))}", soft_wrap=True)
    told, lock = [], threading.Lock()

    def tell(exc: KeyboardInterrupt) -> None:
        with lock:  # the watchdog's thread may say it too: once
            if told:
                return
            told.append(exc)
            dog.said.set()
        # the step in progress is dropped; what the last checkpoint holds stays, and the
        # steps after it are trained again: worth knowing before stopping a long epoch
        step, saved = position.get("step"), position.get("saved")
        where = ""
        if step is not None and saved is not None:
            where = f" (step {saved}" + (
                "" if step <= saved else f"; step {step} is trained again" if step == saved + 1
                else f"; steps {saved + 1}-{step} are trained again") + ")"
        print(f"localnet: {stopped_by(exc)[0]}"
              f"{f' after step {step}' if step is not None else ''}; " + (
            f"resume from the last checkpoint{where} with: localnet run --resume {run_dir}"
            if (run_dir / "checkpoint.pt").exists() else
            f"no checkpoint yet in {run_dir}, nothing to resume" if run_dir.exists() else
            "it had not trained yet, so nothing was kept"), file=sys.stderr, flush=True)

    # a main thread stuck in a Ray call after the signal still gets its stop recorded and
    # the line said
    position: dict = {}

    def stuck(signum: int) -> None:
        record_signal_stop(run_dir, signum, position)
        tell(Terminated("SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt())

    with Watchdog(stuck) as dog:
        try:
            summary = train(cfg, run_dir, resume=bool(args.resume),
                            progress=not args.no_progress, on_interrupt=tell,
                            position=position)
        except BaseException as exc:
            if not args.resume and fresh and not isinstance(exc, RunInUseError):
                _drop_if_unstarted(run_dir, made)  # (held: another run just made it)
            if not isinstance(exc, KeyboardInterrupt):
                said = (ConfigError, DivergedError, RunInUseError)  # these say what to do
                if (run_dir / "checkpoint.pt").exists() and not isinstance(exc, said):
                    exc.add_note(f"its last checkpoint is kept; once that is fixed, go on from "
                                 f"it with: localnet run --resume {run_dir}")
                raise
            tell(exc)  # unless said already (stopped before training began: not yet)
            return stopped_by(exc)[1]
    if summary.get("finished"):
        print(f"localnet: {run_dir} finished at step {summary['steps']} "
              f"({counted(summary['epochs'], 'epoch')}); nothing to resume, nothing "
              f"changed.  Its summary: {summary['summary_path']}", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("rule", "model", "dataset", "epochs", "steps",
                                              "test_accuracy", "test_loss", "samples_per_s")}))
    print(f"run directory: {run_dir}")
    print(f"plots and a table: localnet report {run_dir}", file=sys.stderr)
    return 0


def _same_divergence_ahead(run_dir: Path, cfg) -> None:
    """A run that diverged, resumed with the config it diverged with: a resumed run
    retraces the uninterrupted one step for step, so it will diverge at the same step."""
    stopped = run_dir / "stopped.json"
    if not stopped.is_file():
        return
    try:
        record = json.loads(stopped.read_text())
        before, _ = load_run_config(run_dir)
    except (ValueError, ConfigError):
        return  # only advice: a record it cannot read gives none
    if record.get("how") == "diverged" and before == cfg:
        print(f"localnet: note: this run diverged after step {record.get('after_step')}, and "
              f"it goes on with the same config, so it retraces those steps and diverges "
              f"again; a smaller rate goes on differently: --set train.lr="
              f"{cfg.train.lr / 10:g}", file=sys.stderr)


def _refuse_a_run_in(out: Path) -> None:
    """A new run would start its logs afresh and write its checkpoint over the one there:
    a directory holding a run is resumed or left alone."""
    held = [f for f in ("checkpoint.pt", "summary.json", "metrics.jsonl") if (out / f).exists()]
    if "checkpoint.pt" in held:
        raise ConfigError(f"--out {out} already holds a run ({', '.join(held)}); continue it "
                          f"with: localnet run --resume {out}, or give another --out")
    if held:  # its logs are what is left of it (a NaN before the first checkpoint, say)
        raise ConfigError(f"--out {out} holds a run that stopped before its first checkpoint "
                          f"({', '.join(held)}), so there is nothing to resume; give another "
                          f"--out, or remove it to reuse the name")
    # a run's files among others (`--out .`, a data folder) are hard to tell apart and to
    # remove; what a run that stopped before its first step left is no one else's
    others = sorted(f.name for f in out.iterdir() if not _unstarted(f)) if out.is_dir() else []
    if others:
        raise ConfigError(f"--out {out} holds other files ({first_few(others)}): a run goes "
                          f"into a new or empty directory; give another --out")


def _missing(path: Path) -> list[Path]:
    """path and its ancestors that do not exist yet, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def _unstarted(f: Path) -> bool:
    """A file a run writes before its first step: its config, its logs while empty."""
    return f.is_file() and (f.name == "config.yaml" or (f.suffix == ".jsonl" and
                                                         f.stat().st_size == 0))


def _drop_if_unstarted(run_dir: Path, made: list[Path]) -> None:
    """Remove the directory a new run made when the run failed before it trained a step
    worth keeping (a missing dataset, an unreachable cluster, a batch larger than the
    data): nothing in it but its config and empty logs.  So go the parents it brought
    (`runs/`), where nothing else came to live in them."""
    files = list(run_dir.iterdir()) if run_dir.is_dir() else [run_dir]
    if all(map(_unstarted, files)):
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in made:
            try:
                parent.rmdir()  # only if empty
            except OSError:
                break
