"""Where a pipeline step's CPU goes, and what two processes cost each other.

    python benchmarks/pipeline_probe.py contention       # 1-thread step: alone vs two at once
    python benchmarks/pipeline_probe.py cpu --micro 1 --schedule async
    python benchmarks/pipeline_probe.py cpu --micro 4 --schedule gpipe --steps 20
    python benchmarks/pipeline_probe.py cpu --micro 8 --schedule gpipe

contention   one full ResNet-20 + PFA training step (batch --batch, one torch thread) in
             this process, then the same in two processes started together: the median
             step time of each.  Two single-threaded actors can beat the 2-thread
             in-process executor by at most (2 x alone / together) / (2-thread speed-up).
cpu          a 2-stage RayExecutor (partition balanced by cost) runs --steps steps; every
             process's CPU time (/proc/<pid>/stat) over them, per step, grouped as the
             actors, the driver, the raylet, the GCS and the rest.

resim        re-run the simulator on saved runs of benchmarks/pipeline.py (its output, the
             last line of which is the JSON with every row's profiled costs), with the
             simulator as it is now: `python benchmarks/pipeline.py --no-write > run.log`,
             then `python benchmarks/pipeline_probe.py resim run.log`.

Figures quoted from it in benchmarks/RESULTS.md (pipeline notes) come from these commands.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

import torch  # noqa: E402

from localnet.alloc import keep_freed_memory  # noqa: E402
from pipeline import SHAPE, NC, InProcess, cfg_for, data  # noqa: E402


def step_time(batch: int, steps: int) -> float:
    """Median seconds of one in-process training step at one torch thread."""
    keep_freed_memory()
    return statistics.median(InProcess(batch, data(batch)).times(1, 1, steps, warmup=3))


def contention(args) -> None:
    alone = step_time(args.batch, args.steps)
    cmd = [sys.executable, __file__, "_step", "--batch", str(args.batch), "--steps", str(args.steps)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    together = [float(p.communicate(timeout=600)[0].strip()) for p in procs]
    print(f"1-thread step alone {alone * 1e3:.1f} ms; two processes at once "
          f"{', '.join(f'{t * 1e3:.1f}' for t in together)} ms "
          f"(x{statistics.mean(together) / alone:.2f})")


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (group, CPU seconds so far) for every process (kernel threads skipped)."""
    tck, me, out = os.sysconf("SC_CLK_TCK"), os.getpid(), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if not cmdline:  # a kernel thread
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        f = stat[stat.rindex(")") + 2:].split()
        group = ("driver" if int(pid) == me else "actors" if "StageWorker" in cmdline
                 else "raylet" if name == "raylet" else "gcs" if name.startswith("gcs_server")
                 else "other")
        out[int(pid)] = (group, (int(f[11]) + int(f[12])) / tck)
    return out


def cpu(args) -> None:
    import ray

    from localnet.runtime.cost import measure_costs
    from localnet.runtime.partition import balanced_boundaries
    from localnet.runtime.ray_executor import RayExecutor
    from localnet.runtime.worker import StageWorker

    keep_freed_memory()
    torch.set_num_threads(1)
    M, stash = args.micro, args.schedule == "async"
    f, b, _ = measure_costs(cfg_for(M=M, batch=args.batch), SHAPE, NC, None,
                            args.batch // M, 3, 1, stash)
    cut = balanced_boundaries([x + y for x, y in zip(f, b)], 2)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        cfg = cfg_for(args.schedule, M, args.batch, cut)
        pool = [ray.remote(num_cpus=0)(StageWorker).remote(
            threads=1, cpu_policy=cfg.runtime.cpu_policy) for _ in range(2)]
        ex = RayExecutor(cfg, SHAPE, NC, actors=pool)
        batches = data(args.batch)
        for i in range(4):
            ex.train_step(*batches[i % 4], 0.01, 1e-4)
        ex.flush()
        before, t0 = process_cpu(), time.perf_counter()
        for i in range(args.steps):
            ex.train_step(*batches[i % 4], 0.01, 1e-4)
        ex.flush()
        dt, after = time.perf_counter() - t0, process_cpu()
    finally:
        ray.shutdown()
    groups: dict[str, list[float]] = {}
    for pid, (group, c) in after.items():
        if pid in before:
            groups.setdefault(group, []).append((c - before[pid][1]) / args.steps * 1e3)
    print(f"S=2 M={M} {args.schedule} cut {cut}: "
          f"{args.batch * args.steps / dt:.1f} samples/s, "
          f"{dt / args.steps * 1e3:.1f} ms per step; CPU ms per step:")
    for group, ms in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        busy = sorted((round(v, 1) for v in ms if v >= 0.05), reverse=True)
        if busy:
            print(f"  {group:7s} {busy}")


def resim(args) -> None:
    import json

    from pipeline import predict

    for path in args.logs:
        d = json.loads(Path(path).read_text().strip().splitlines()[-1])
        worst = 0.0
        for r in d["rows"]:
            p, S, M = r["profiled"], r["stages"], r["micro_batches"]
            costs = (p["forward"], p["backward"], p["update"]) if S <= d["cores"] else p["cpu"]
            pred, _ = predict(r["schedule"], S, M, *costs, p["boundary_bytes"],
                              {"curve": d["hop_curve"]}, d["cores"], d["batch"],
                              p.get("per_hop_overhead_s"))
            err = abs(pred - r["samples_per_s"]) / r["samples_per_s"]
            worst = max(worst, err)
            print(f"{path}: S={S} M={M} {r['schedule']:5s} measured {r['samples_per_s']:7.1f}  "
                  f"recorded prediction {r['predicted']:7.1f} ({r['sim_error']:.1%})  "
                  f"now {pred:7.1f} ({err:.1%})")
        print(f"{path}: worst row now {worst:.1%} (recorded {d['sim_error_max']:.1%})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["contention", "cpu", "resim", "_step"])
    p.add_argument("logs", nargs="*", help="resim: saved outputs of benchmarks/pipeline.py")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--schedule", default="async", choices=["gpipe", "1f1b", "async"])
    args = p.parse_args(argv)
    if args.what == "_step":  # one of contention's two processes
        print(step_time(args.batch, args.steps))
    else:
        {"contention": contention, "cpu": cpu, "resim": resim}[args.what](args)


if __name__ == "__main__":
    main()
