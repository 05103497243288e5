"""The main job on Ray against the same job in one process, interleaved.

    python benchmarks/main_job.py                       # 3 rounds, configs/resnet_pfa.yaml
    python benchmarks/main_job.py --set runtime.partition=per_layer --tag per-layer
    python benchmarks/main_job.py --rounds 2 --no-write

Runs `localnet run configs/resnet_pfa.yaml` (11 actors, 1f1b, 4 micro-batches of 32) on a
CIFAR-10 subset for `--epochs` epochs (2) with `runtime.executor=inprocess`, then with the
config's Ray executor, once each per round, and reads what each run reports in
summary.json: samples/s (training steps only) over the whole run and, from
metrics.jsonl, over its last epoch.  The real job trains 250 epochs; its speed is the
later epochs', while a short run's first epoch also pays for each actor's first batches
(allocations, kernels built on first use), which the in-process run pays far less of.
For Ray the start-up until every actor is ready (`runtime.startup_s`:
ray.init, spawning, building, the data plane) and the coordinator's calls per batch,
and where the CPU went: the actors' main threads by part, the coordinator, and the whole
machine over the training (`machine_cpu_s`: busy, the kernel's share, idle cores).
This machine's speed drifts by 10-30% within minutes, so each Ray run is compared with
the in-process run of the same round, and the ratios' median is reported.  Results go to
benchmarks/RESULTS.md between <!-- main-job:TAG --> markers (--no-write: not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import commit, hardware_cpu, write_section  # noqa: E402

from localnet.timing import busy_s  # noqa: E402

SHORT = ["data.subset=6400", "data.test_subset=500", "metrics.alignment_every=0"]


def run_once(sets: list[str], out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "localnet", "run", "--no-progress", "configs/resnet_pfa.yaml",
           "--out", str(out)]
    for s in SHORT + sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    rt = s.get("runtime") or {}
    cpu = [c for c in rt.get("actor_startup_cpu_s") or [] if c is not None]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"samples_per_s": s["samples_per_s"], "wall_s": wall, "actors": rt.get("actors", 0),
            "last_epoch_samples_per_s": epochs[-1]["samples_per_s"],
            "startup_s": rt.get("startup_s"), "calls": rt.get("driver_calls_per_batch"),
            "phases": rt.get("startup_phases_s") or {},
            "actor_cpu_s": statistics.mean(cpu) if cpu else None,
            "peak_used_gb": s.get("peak_used_gb"),
            "machine": _machine(s.get("machine_cpu_s"), s["steps"]),
            # the run's CPU per training step, evaluation included: the actors' main
            # threads by part, and the coordinator's process
            "cpu_per_step": {**{k: v / s["steps"] for k, v in (rt.get("actor_cpu_s") or {}).items()},
                             **({"coordinator": rt["coordinator_cpu_s"] / s["steps"]}
                                if "coordinator_cpu_s" in rt else {})}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra overrides for both runs (e.g. runtime.partition=per_layer)")
    p.add_argument("--tag", default="resnet-pfa", help="the RESULTS.md section's tag")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs of the subset per run; the last one is timed on its own")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {"inprocess": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="localnet-main-job-") as tmp:
        for r in range(args.rounds):
            for name, extra in (("inprocess", ["runtime.executor=inprocess"]), ("ray", [])):
                res = run_once([f"train.epochs={args.epochs}"] + args.set + extra,
                               Path(tmp) / f"{name}-{r}", args.timeout)
                runs[name].append(res)
                print(f"round {r + 1} {name}: {res['samples_per_s']:.1f} samples/s "
                      f"({res['last_epoch_samples_per_s']:.1f} in the last epoch), "
                      f"{res['wall_s']:.0f} s, start-up {res['startup_s']}", flush=True)

    def ratios_of(key):
        return [a[key] / b[key] for a, b in zip(runs["ray"], runs["inprocess"])]

    ratios, last = ratios_of("samples_per_s"), ratios_of("last_epoch_samples_per_s")
    ray_runs = runs["ray"]
    result = {"hardware": hardware_cpu(), "commit": commit(), "sets": args.set,
              "inprocess": [round(x["samples_per_s"], 1) for x in runs["inprocess"]],
              "ray": [round(x["samples_per_s"], 1) for x in ray_runs],
              "ratios": [round(x, 3) for x in ratios],
              "ratio_median": round(statistics.median(ratios), 3),
              "last_epoch": {k: [round(x["last_epoch_samples_per_s"], 1) for x in v]
                             for k, v in runs.items()},
              "last_epoch_ratios": [round(x, 3) for x in last],
              "last_epoch_ratio_median": round(statistics.median(last), 3),
              "actors": ray_runs[0]["actors"], "calls_per_batch": ray_runs[0]["calls"],
              "startup_s": [round(x["startup_s"], 1) for x in ray_runs if x["startup_s"]],
              "wall_s": {k: [round(x["wall_s"]) for x in v] for k, v in runs.items()},
              "cpu_per_step": [{k: round(v, 4) for k, v in x["cpu_per_step"].items()}
                               for x in ray_runs],
              "machine": [x["machine"] for x in ray_runs],
              "command": "python benchmarks/main_job.py " + " ".join(argv or sys.argv[1:])}
    if not args.no_write:
        sets = "".join(f" --set {s}" for s in SHORT + [f"train.epochs={args.epochs}"] + args.set)
        lines = [f"### The main job: Ray ÷ in-process ({args.tag})", "",
                 f"Hardware: {result['hardware']}.  Commit `{result['commit']}`.  Command: "
                 f"`{result['command'].strip()}`: `localnet run configs/resnet_pfa.yaml{sets}` "
                 f"in-process, then on Ray ({result['actors']} actors), once each per round; "
                 f"samples/s from each run's summary.json (the whole run) and metrics.jsonl "
                 f"(its last epoch); each ratio within its round.", "",
                 "| round | in-process samples/s | Ray samples/s | Ray ÷ in-process | the last "
                 "epoch: in-process / Ray samples/s (Ray ÷ in-process) | Ray start-up "
                 "until every actor is ready (s) | of which ray.init / placement / actors "
                 "built / data plane (s) | CPU each actor used to get ready (s, mean) | "
                 "wall in-process / Ray (s) | Ray, CPU per step (s): actors' compute / data "
                 "plane / interpreter / Ray calls; coordinator | Ray, the machine over "
                 "training: busy CPU per step (s) / of which the kernel's / idle |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for i in range(args.rounds):
            ph = ray_runs[i]["phases"]
            phases = " / ".join(f"{ph[k]:.1f}" if k in ph else "-"
                                for k in ("ray_init", "placement", "actors_built", "plane"))
            cpu = ray_runs[i]["actor_cpu_s"]
            lines.append(f"| {i + 1} | {result['inprocess'][i]} | {result['ray'][i]} | "
                         f"{result['ratios'][i]} | {result['last_epoch']['inprocess'][i]} / "
                         f"{result['last_epoch']['ray'][i]} ({result['last_epoch_ratios'][i]}) | "
                         f"{ray_runs[i]['startup_s']:.1f} | {phases} | "
                         f"{'-' if cpu is None else f'{cpu:.2f}'} | "
                         f"{result['wall_s']['inprocess'][i]} / {result['wall_s']['ray'][i]} | "
                         f"{_cpu_cell(ray_runs[i]['cpu_per_step'])} | "
                         f"{_machine_cell(ray_runs[i]['machine'])} |")
        lines += ["", f"Median Ray ÷ in-process: **{result['ratio_median']}** over the whole "
                      f"run, **{result['last_epoch_ratio_median']}** over its last epoch.  "
                      f"Coordinator "
                      f"calls per training batch: {result['calls_per_batch']} (one per actor "
                      f"per call; runtime.batches_per_call)."]
        write_section(f"main-job:{args.tag}", lines)
    return result


def _machine(cpu: dict | None, steps: int) -> dict | None:
    """The whole machine over the run's training (summary.json `machine_cpu_s`): busy CPU
    seconds per step, of which the kernel's (system, softirq: a message's copies through
    the kernel are there), and the share of the cores left idle."""
    if not cpu or not steps:
        return None
    busy = busy_s(cpu)
    return {"busy_per_step": busy / steps,
            "kernel_per_step": (cpu.get("system", 0.0) + cpu.get("softirq", 0.0)) / steps,
            "idle": 1.0 - busy / max(sum(cpu.values()), 1e-9)}


def _machine_cell(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{m['busy_per_step']:.3f} / {m['kernel_per_step']:.3f} / {m['idle']:.1%}"


def _cpu_cell(c: dict) -> str:
    if not c:
        return "-"
    parts = " / ".join(f"{c[k]:.3f}" if k in c else "-"
                       for k in ("compute", "plane", "interpreter", "calls"))
    return parts + (f"; {c['coordinator']:.3f}" if "coordinator" in c else "")


if __name__ == "__main__":
    os.environ.setdefault("LOCALNET_DATA", str(ROOT.parent / "shared" / "data"))
    print(json.dumps(main()))
