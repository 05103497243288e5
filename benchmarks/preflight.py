"""The memory preflight against the machine: each run's estimate beside what it took.

    python benchmarks/preflight.py                      # error links delayed 0, 2 and 8 steps
    python benchmarks/preflight.py --variants "channel.error.delay=1;runtime.partition=per_layer"
    python benchmarks/preflight.py --no-write

The main job's config (configs/resnet_pfa.yaml: ResNet-20, 11 actors, 1f1b, 4 micro-batches
of 32) on an embedded Ray, once per variant (`--variants`: `;` between variants, `,`
between the `--set`s of one).  For each: the preflight's estimate of its actors
(`runtime.plan.check_partition`, what `localnet validate` prints), and the machine's peak
used memory while Ray starts, the actors get ready and train, less what was used before.
The run trains until the longest-waiting forwards have all been stored (the delays along
the stem's path, `error_wait_steps`) and `--steps` more, on random CIFAR-shaped batches.
The peak also holds Ray's own processes, the coordinator and its batches, so it sits
above the estimate of the actors alone; what matters is that the estimate grows as the
memory does, so that the preflight refuses what would not fit, and only that.  Results
go to benchmarks/RESULTS.md between <!-- preflight --> markers (--no-write: not).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Peak, commit, hardware_cpu, ray_benchmark_env, used_mb, write_section  # noqa: E402

CONFIG = HERE.parent / "configs" / "resnet_pfa.yaml"
SHAPE, NC = (3, 32, 32), 10
DEFAULT = "channel.error.delay=0;channel.error.delay=2;channel.error.delay=8"


def settled_mb(limit_s: float = 120.0) -> float:
    """The machine's used memory once it stops falling: the last run's Ray leaves its
    processes exiting for a while, which the next run would count as idle."""
    t0, last = time.monotonic(), used_mb()
    while time.monotonic() - t0 < limit_s:
        time.sleep(5.0)
        now = used_mb()
        if last - now < 16:
            return now
        last = now
    return last


def train(sets: list[str], steps: int) -> dict:
    """In the child process: the estimate, then the run (Ray, actors, training)."""
    import ray
    import torch

    from localnet.config import load_config
    from localnet.runtime.plan import check_partition
    from localnet.runtime.ray_executor import RayExecutor

    cfg = load_config(CONFIG, ["metrics.alignment_every=0", "runtime.memory_preflight=false",
                               *sets])
    actors, est = check_partition(cfg, memory_too=True)
    wait = est.get("error_wait_steps", 0)
    g = torch.Generator().manual_seed(0)
    bs = cfg.train.batch_size
    data = [(torch.randn(bs, *SHAPE, generator=g), torch.randint(0, NC, (bs,), generator=g))
            for _ in range(4)]
    ex = RayExecutor(cfg, SHAPE, NC)
    try:
        for i in range(wait + steps):
            ex.train_step(*data[i % len(data)], 0.01, 1e-4)
        ex.flush()
    finally:
        ex.close()
        ray.shutdown()
    return {"sets": sets, "actors": actors, "error_wait_steps": wait,
            "estimate_mb": est["total_mb"], "largest_actor_mb": est["per_actor_mb_max"],
            "steps": wait + steps}


def measure(sets: list[str], steps: int) -> dict:
    """One variant in a process of its own, the machine's peak sampled from outside: all
    the run adds (torch, Ray, the actors) above the machine before it."""
    idle = settled_mb()
    peak = Peak()
    proc = subprocess.run([sys.executable, __file__, "--one", ",".join(sets), "--steps",
                           str(steps)], capture_output=True, text=True, timeout=1800)
    top = peak.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"variant {sets} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**row, "idle_mb": round(idle), "peak_mb": round(top), "added_mb": round(top - idle)}


def write_results(r: dict) -> None:
    lines = [
        "### The memory preflight's estimate against the machine (the main job's config)", "",
        f"Hardware: {r['hardware']}.  Commit `{r['commit']}`.  Command: `{r['command']}`.  "
        "Estimate: the preflight's, of the actors alone (`localnet validate` prints it).  "
        "Measured: the machine's peak used memory (MemTotal - MemAvailable) while Ray "
        "started, the actors got ready and trained, less what was used before; it also "
        "holds Ray's own processes and the coordinator.", "",
        "| variant | actors | forwards wait (steps) | steps run | estimate (MB) | largest actor (MB) | measured (MB) | measured / estimate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        lines.append(
            f"| `{' '.join(row['sets']) or 'as configured'}` | {row['actors']} | "
            f"{row['error_wait_steps']} | {row['steps']} | {row['estimate_mb']} | "
            f"{row['largest_actor_mb']} | {row['added_mb']} | "
            f"{row['added_mb'] / row['estimate_mb']:.2f} |")
    write_section("preflight", lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=DEFAULT,
                   help="';' between variants, ',' between one variant's --set a.b=c")
    p.add_argument("--steps", type=int, default=8,
                   help="steps after the longest-waiting forwards are all stored")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's variant
    args = p.parse_args(argv)
    ray_benchmark_env()
    if args.one is not None:
        print(json.dumps(train([s for s in args.one.split(",") if s], args.steps)))
        return {}
    rows = []
    for variant in args.variants.split(";"):
        sets = [s.strip() for s in variant.split(",") if s.strip()]
        rows.append(measure(sets, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    result = {"hardware": hardware_cpu(), "commit": commit(), "rows": rows,
              "command": shlex.join(["python", "benchmarks/preflight.py", *(argv or sys.argv[1:])])}
    if not args.no_write:
        write_results(result)
    return result


if __name__ == "__main__":
    main()
