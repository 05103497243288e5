"""Chaos: kill actors and the driver during one epoch; the run must end exactly where an
uninterrupted one ends.

    python benchmarks/chaos.py                 # writes the `chaos` section of RESULTS.md
    python benchmarks/chaos.py --no-write

Two runs of the same `localnet run` command (Ray, one actor per unit group, a checkpoint
every `--every` steps):
  reference  never interrupted;
  chaos      `kill -9` of a random stage actor at the steps of `--kill-actors`, then of
             the driver itself at `--kill-driver` (and `ray stop` of what it left), then
             `localnet run --resume`, which meets more actor kills at `--kill-after`.
Each actor death costs a recovery: the coordinator recreates the actor, every actor loads
the last checkpoint, and the steps since it are replayed.  Reported: each recovery
(cause, step restored, steps replayed, seconds) from the resumed run's summary.json, and
the largest difference of any tensor (weights, feedback weights, optimizer and RNG
states) between the two runs' final checkpoints -- 0 means exactly once -- and which
counts of their messages.json differ (none: each message was counted once, through the
kills).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, commit, hardware_cpu, write_section  # noqa: E402

SETS = ["data.name=synthetic", "data.test_subset=256", "model.name=mlp",
        "model.widths=[256,256,256]", "rule.name=pfa", "train.epochs=1", "train.batch_size=8",
        "train.micro_batches=2", "train.lr=0.01", "metrics.alignment_every=1",
        "runtime.executor=ray", "runtime.schedule=1f1b", "runtime.threads=1",
        "runtime.max_recoveries=10", "runtime.timeout_s=60"]


def command(out: Path, every: int, resume: bool = False, extra=()) -> list[str]:
    base = [sys.executable, "-m", "localnet", "run", "--no-progress"]
    if resume:
        return base + ["--resume", str(out)]
    sets = [a for s in SETS + [f"runtime.checkpoint_every={every}", *extra]
            for a in ("--set", s)]
    return base + [str(ROOT / "configs/mnist_mlp.yaml"), *sets, "--out", str(out)]


def step_of(run: Path) -> int:
    """The last step the run logged (steps.jsonl, every step here)."""
    f = run / "steps.jsonl"
    if not f.exists():
        return 0
    lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except (ValueError, KeyError):
        return 0


def stage_actors() -> list[int]:
    """PIDs of this machine's stage actors (Ray names their processes ray::StageWorker)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().startswith(b"ray::StageWorker"):
                out.append(int(d.name))
        except OSError:  # gone meanwhile
            pass
    return out


def run_with_kills(cmd: list[str], run: Path, actor_steps: list[int], driver_step: int | None,
                   rng: random.Random, log) -> tuple[int, list[dict]]:
    """Run cmd; kill a random stage actor once the run has logged each step of
    actor_steps, and the driver at driver_step.  Returns (exit code, kills)."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    todo = sorted(actor_steps)
    kills = []
    while proc.poll() is None:
        step = step_of(run)
        if todo and step >= todo[0]:
            pids = stage_actors()
            if pids:
                pid = rng.choice(pids)
                os.kill(pid, signal.SIGKILL)
                kills.append({"what": "actor", "pid": pid, "after_step": step})
                todo.pop(0)
        if driver_step is not None and step >= driver_step:
            proc.kill()
            proc.wait()
            kills.append({"what": "driver", "after_step": step})
            # the driver's embedded Ray outlives it: stop it, as a scheduler would
            subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
            return -9, kills
        time.sleep(0.05)
    return proc.returncode, kills


def final_state(run: Path) -> dict:
    from localnet.files import load_state

    manifest = json.loads((run / "checkpoint/manifest.json").read_text())
    gen = run / "checkpoint" / manifest["generation"]
    return {a["actor"]: load_state(gen / a["file"]) for a in manifest["actors"]}


def largest_difference(a, b) -> float:
    if isinstance(a, torch.Tensor):
        if a.dtype.is_floating_point:
            return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        return 0.0 if torch.equal(a, b) else float("inf")
    if isinstance(a, dict):
        return max([largest_difference(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        return max([largest_difference(x, y) for x, y in zip(a, b)] or [0.0])
    return 0.0 if a == b else float("inf")


def messages_differences(a: Path, b: Path) -> tuple[list[str], int]:
    """The counts of messages.json that differ between two runs (per edge and kind,
    training, evaluation and probe bytes, samples, steps), and the first run's training
    bytes."""
    ma, mb = (json.loads((r / "messages.json").read_text()) for r in (a, b))
    keys = ("edges", "train_bytes", "eval_bytes", "probe_bytes", "samples", "steps")
    return [k for k in keys if ma.get(k) != mb.get(k)], int(ma["train_bytes"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/localnet-chaos")
    p.add_argument("--every", type=int, default=6, help="runtime.checkpoint_every")
    p.add_argument("--kill-actors", default="9,25", help="steps after which an actor dies")
    p.add_argument("--kill-driver", type=int, default=40)
    p.add_argument("--kill-after", default="50,58", help="actor kills after the resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another config override for both runs, e.g. runtime.schedule=async")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    rng = random.Random(args.seed)
    steps = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    log = open(out / "log.txt", "wb")

    t0 = time.perf_counter()
    rc = subprocess.run(command(out / "reference", args.every, extra=args.set), stdout=log,
                        stderr=subprocess.STDOUT).returncode
    assert rc == 0, f"the reference run failed; see {out / 'log.txt'}"
    ref_s = time.perf_counter() - t0

    chaos = out / "chaos"
    t0 = time.perf_counter()
    rc, kills = run_with_kills(command(chaos, args.every, extra=args.set), chaos,
                               steps(args.kill_actors),
                               args.kill_driver, rng, log)
    assert rc == -9, f"the run ended (exit {rc}) before the driver was killed; see the log"
    rc, more = run_with_kills(command(chaos, args.every, resume=True), chaos,
                              steps(args.kill_after), None, rng, log)
    assert rc == 0, f"the resumed run failed (exit {rc}); see {out / 'log.txt'}"
    chaos_s = time.perf_counter() - t0
    kills += more

    summary = json.loads((chaos / "summary.json").read_text())
    ref = json.loads((out / "reference/summary.json").read_text())
    recoveries = summary["runtime"].get("recoveries", [])
    diff = largest_difference(final_state(out / "reference"), final_state(chaos))
    msg_diff, train_bytes = messages_differences(out / "reference", chaos)
    result = {"hardware": hardware_cpu(), "commit": commit(),
              "command": "python benchmarks/chaos.py " + " ".join(argv or sys.argv[1:]),
              "sets": args.set, "steps": summary["steps"], "kills": kills,
              "recoveries": recoveries,
              "largest_difference": diff, "messages_differ": msg_diff,
              "train_bytes": train_bytes, "reference_s": round(ref_s, 1),
              "chaos_s": round(chaos_s, 1), "test_loss": [ref["test_loss"], summary["test_loss"]]}
    print(json.dumps(result))
    if not args.no_write:
        write(result)
    return result


def write(r: dict) -> None:
    rows = [f"| {i + 1} | {rec['at_step']} | {', '.join(rec['dead'])} | {rec['restored_step']} "
            f"| {rec.get('replayed_steps', 0)} | {rec['lost_steps']} | {rec['seconds']:.1f} |"
            for i, rec in enumerate(r["recoveries"])]
    kills = ", ".join(f"{k['what']} after step {k['after_step']}" for k in r["kills"])
    write_section("chaos", [
        "### Chaos: actors and the driver killed during one epoch", "",
        f"Hardware: {r['hardware']}.  Commit `{r['commit']}`.  Command: `{r['command']}`: "
        f"`localnet run` on Ray (MLP 256-256-256, 4 actors, PFA, 1f1b, a checkpoint every 6 "
        f"steps, {r['steps']} steps{''.join(f', `--set {x}`' for x in r.get('sets', []))}), once "
        f"uninterrupted and once with `kill -9`: {kills}; "
        f"the driver's run resumed with `--resume`.", "",
        "| recovery | at step | dead | restored step | steps replayed | steps lost | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |", *rows, "",
        f"Largest difference of any tensor of the final checkpoints (weights, feedback "
        f"weights, optimizer and RNG states) from the uninterrupted run: "
        f"**{r['largest_difference']:g}**.  Test loss {r['test_loss'][0]:.6f} uninterrupted, "
        f"{r['test_loss'][1]:.6f} with the kills.  `messages.json`: "
        + (f"**every count equal** to the uninterrupted run's (each edge's messages and "
           f"bytes per kind; {r['train_bytes']:,} training bytes)" if not r["messages_differ"]
           else f"**{', '.join(r['messages_differ'])} differ** from the uninterrupted run's")
        + f".  Wall time {r['reference_s']} s uninterrupted, {r['chaos_s']} s with the "
        f"kills."])


if __name__ == "__main__":
    main()
