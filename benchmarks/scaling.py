"""Scaling with the number and fineness of actors: CIFAR ResNets, per unit and per layer.

    python benchmarks/scaling.py                         # ResNet-20/32/56 x per_unit/per_layer
    python benchmarks/scaling.py --models resnet20 --partitions per_layer --steps 8 --no-write
    python benchmarks/scaling.py --baseline              # a bare torch actor; + torch._dynamo;
                                                         # the CPU an actor needs to get ready

For each model and partition (PFA, 1f1b, batch 128 in 4 micro-batches, CIFAR-shaped
synthetic input, one torch thread per actor, an embedded Ray of its own):

  in-process   InProcessExecutor at the machine's cores in threads, median step time
  ray          RayExecutor: start-up until every actor is ready, median step time, the
               machine's peak used memory during the run (MemTotal - MemAvailable,
               sampled every 0.2 s; the idle machine's use before the run is reported
               beside it), and each actor's private memory (/proc/PID/smaps_rollup)
  baseline     in the same run: a bare Ray actor that imports torch and does nothing --
               the process floor an actor cannot go below; an actor's private memory
               above it is what localnet's own state costs, measured after set-up and
               again after the timed steps (then with training's in-flight peak).  It is
               killed once measured: the run's peak does not include it
  heap         malloc's books in the median actor between batches (`alloc.heap_mb`):
               live (weights, optimizer state, sends the receivers took but the actor
               has not yet reclaimed) and kept free (what the batch's peak needed on top)
  simulator    `localnet simulate`'s prediction a priori (measured unit costs, the
               machine's cores, a message's CPU from the data plane's hop: --hop-cost
               plus --hop-cost-per-mib x its payload), and again on the run's own
               profile (each actor's compute, the rest of the machine's CPU per message):
               how far the costs are off, and how far the model of the schedule is
  preflight    runtime/memory.py's estimate; a partition it refuses is reported as such
  at most      the ratio's bounds on the run's CPU account (`bounds`): what Ray could
               reach with every core busy, as measured, with a data plane that cost
               nothing, and with only the actors' compute

Then a projection past this machine: a cluster of 1..64 actors with one GPU each running
ResNet-56 per layer (56 layers, grouped into consecutive stages; one each at most), from a stated cost model
(`gpu_cost`: each layer's FLOPs at a sustained rate, plus a fixed launch cost per layer
and pass) and a hop cost per message, through the same simulator.  Writes the table and a
plot (benchmarks/scaling.png) into benchmarks/RESULTS.md (--no-write: not).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import Peak, commit, hardware_cpu, ray_benchmark_env, used_mb, write_section

ray_benchmark_env()

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
from localnet.alloc import release_free_memory  # noqa: E402
from localnet.config import Config  # noqa: E402
from localnet.runtime.cpu_policy import POLICIES  # noqa: E402
from localnet.timing import cpu_parts, machine_busy_s  # noqa: E402

MAIN = "ray::StageWorke"  # an actor's main thread: Ray names it after the class (15 chars)

SHAPE, NC = (3, 32, 32), 10


def cfg_for(model: str, partition: str, batch: int, M: int,
            cpu_policy: str | None = None, memory_format: str | None = None,
            allocator: str | None = None) -> Config:
    return Config.model_validate({
        "seed": 0, "rule": {"name": "pfa"}, "model": {"name": model},
        "data": {"name": "synthetic"},
        "train": {"batch_size": batch, "micro_batches": M, "lr": 0.01, "momentum": 0.9,
                  "weight_decay": 1e-4,
                  **({"memory_format": memory_format} if memory_format else {})},
        "runtime": {"executor": "ray", "schedule": "1f1b", "partition": partition,
                    "threads": 1, "timeout_s": 600, "local_cpus": 4,
                    **({"cpu_policy": cpu_policy} if cpu_policy else {}),
                    **({"allocator": allocator} if allocator else {})}})


def batches(batch: int, n: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, *SHAPE, generator=g), torch.randint(0, NC, (batch,), generator=g))
            for _ in range(n)]


def private_mb(pid: int) -> float:
    """Private (unshared) memory of a process, clean + dirty, from smaps_rollup."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024


HZ = os.sysconf("SC_CLK_TCK")


def _ticks(stat_path: str) -> float:
    """utime + stime of a /proc/.../stat file, in seconds."""
    f = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread *name* of a process (gloo's I/O threads are gloo_tcp_loop;
    an actor's main thread is named after its class)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            out[name] = out.get(name, 0.0) + _ticks(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            pass
    return out


def preemptions(pid: int) -> int:
    """How often the kernel took the CPU from a process's main thread while it could
    still run (nonvoluntary_ctxt_switches of /proc/PID/status: the main thread's own)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("nonvoluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0



class Idle:
    """What a Ray actor costs before any model: Ray's worker and `import torch`."""

    def __init__(self):
        import torch  # noqa: F401 - what every stage actor imports

    def pid(self) -> int:
        return os.getpid()

    def import_dynamo(self) -> float:
        """CPU seconds of `import torch._dynamo` (what torch.optim.SGD does on first use;
        localnet/optim.py avoids it)."""
        t = time.process_time()
        import torch._dynamo  # noqa: F401
        return time.process_time() - t


class Bare:
    """A Ray actor that has imported nothing of its own yet: the CPU an actor spends to
    get ready, phase by phase (`process_time` counts every thread of the process)."""

    def worker_cpu(self) -> float:
        """CPU seconds the process used to become a Ray worker and take its first call."""
        return time.process_time()

    def import_cpu(self, module: str) -> float:
        import importlib

        t = time.process_time()
        importlib.import_module(module)
        return time.process_time() - t


def startup_floor(ray, actors: int = 3) -> dict:
    """Median CPU seconds per actor of each start-up phase, actors started one at a time
    (so none waits for a core): Ray's worker, `import torch`, then localnet's stage
    actor module (`localnet.runtime.worker`, torch already in)."""
    phases: dict[str, list[float]] = {"ray_worker": [], "torch": [], "localnet": []}
    for _ in range(actors):
        a = ray.remote(num_cpus=0)(Bare).remote()
        phases["ray_worker"].append(ray.get(a.worker_cpu.remote(), timeout=120))
        phases["torch"].append(ray.get(a.import_cpu.remote("torch"), timeout=120))
        phases["localnet"].append(ray.get(a.import_cpu.remote("localnet.runtime.worker"),
                                          timeout=120))
        ray.kill(a)
    return {k: round(statistics.median(v), 2) for k, v in phases.items()}


def baseline(write: bool) -> dict:
    """A bare torch actor's private memory, what importing torch._dynamo adds, and the
    CPU an actor needs to get ready."""
    import ray

    # the workers on the malloc the runtime gives its actors (runtime.allocator)
    os.environ.setdefault("RAY_LD_PRELOAD_ON_WORKERS", "1")
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t
    try:
        a = ray.remote(num_cpus=0)(Idle).remote()
        pid = ray.get(a.pid.remote(), timeout=120)
        before = private_mb(pid)
        cpu = ray.get(a.import_dynamo.remote(), timeout=120)
        dynamo_mb = private_mb(pid) - before
        ray.kill(a)
        floor = startup_floor(ray)
        r = {"bare_mb": round(before, 1), "dynamo_mb": round(dynamo_mb, 1),
             "dynamo_cpu_s": round(cpu, 2), "ray_init_s": round(init_s, 2),
             "startup_cpu_s": floor, "hardware": hardware_cpu(), "commit": commit()}
    finally:
        ray.shutdown()
    f = r["startup_cpu_s"]
    if write:
        write_section("scaling:baseline", [
            "### An actor's floor, and what torch._dynamo would add", "",
            f"Hardware: {r['hardware']}.  Commit `{r['commit']}`.  Command: "
            "`python benchmarks/scaling.py --baseline`: a Ray actor that imports torch and "
            "does nothing, its private memory (smaps_rollup), then `import torch._dynamo` "
            "in it (what torch.optim.SGD does on first use; `localnet/optim.py` avoids it).",
            "", "| bare torch actor, private MB | + torch._dynamo, MB | its import, CPU s |",
            "| --- | --- | --- |",
            f"| {r['bare_mb']} | {r['dynamo_mb']} | {r['dynamo_cpu_s']} |", "",
            "What an actor spends to get ready, in CPU seconds (median of 3 actors started "
            "one at a time), and `ray.init` of the embedded Ray (wall, this run):", "",
            "| Ray worker, to its first call | `import torch` | `import localnet.runtime.worker` "
            "| sum | `ray.init` (s) |", "| --- | --- | --- | --- | --- |",
            f"| {f['ray_worker']} | {f['torch']} | {f['localnet']} | "
            f"{round(sum(f.values()), 2)} | {r['ray_init_s']} |", "",
            "On C cores N actors cannot all be ready before `ray.init` + N x sum / C: "
            f"for the main job's 11 actors on 2 cores, {r['ray_init_s']} + 11 x "
            f"{round(sum(f.values()), 2)} / 2 = "
            f"**{round(r['ray_init_s'] + 11 * sum(f.values()) / 2, 1)} s**, before any "
            "actor builds its layers or joins the data plane."])
    return r


def _heap(_actor) -> dict | None:
    """Run inside an actor (`__ray_call__`): malloc's live and kept-free memory."""
    from localnet.alloc import heap_mb

    return heap_mb()


def step_times(step, data, warmup: int, steps: int, cpu: list | None = None) -> list[float]:
    for i in range(warmup):
        step(*data[i % len(data)])
    out = []
    c0 = time.process_time()
    for i in range(steps):
        t0 = time.perf_counter()
        step(*data[i % len(data)])
        out.append(time.perf_counter() - t0)
    if cpu is not None:
        cpu.append((time.process_time() - c0) / steps)
    return out


def inprocess(cfg, data, steps: int, threads: int | None = None) -> tuple[float, float]:
    """(samples/s, CPU seconds per batch) of the in-process executor, at `threads` torch
    threads (default: the machine's cores)."""
    from localnet.runtime.testing import reference

    old = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    cpu: list[float] = []
    try:
        ex, _ = reference(cfg, SHAPE, NC)
        t = step_times(lambda x, y: ex.train_step(x, y, 0.01, 1e-4), data, 2, steps, cpu)
    finally:
        torch.set_num_threads(old)
    return cfg.train.batch_size / statistics.median(t), cpu[0]


def on_ray(cfg, data, steps: int) -> dict:
    import ray

    from localnet.runtime.memory import MemoryPreflightError
    from localnet.runtime.ray_executor import RayExecutor

    idle_mb = used_mb()
    peak = Peak()
    try:
        ex = RayExecutor(cfg, SHAPE, NC)
    except MemoryPreflightError as err:
        peak.stop()
        ray.shutdown()
        return {"refused": str(err)}
    try:
        # the floor, measured in this run (the embedded Ray gives it the actors' malloc);
        # then gone, so that it is not in the run's peak
        base = ray.remote(num_cpus=0)(Idle).remote()
        base_mb = private_mb(ray.get(base.pid.remote(), timeout=120))
        ray.kill(base)
        ex.flush()
        # before any training step: what set-up left (units built, plane open, malloc
        # trimmed); after the steps, the actor also holds its peak in-flight activations
        setup = [private_mb(i["pid"]) for i in ex.stage_info]
        step = lambda x, y: ex.train_step(x, y, 0.01, 1e-4)  # noqa: E731
        step_times(step, data, 2, 0)
        ex.flush()
        ex.stage_timings()  # clears them
        pids = [i["pid"] for i in ex.stage_info]
        sent0 = messages_between_actors(ex)
        before, m0 = [thread_cpu(p) for p in pids], machine_busy_s()
        pre0 = [preemptions(p) for p in pids]
        t = step_times(step, data, 0, steps)
        ex.flush()
        after, m1 = [thread_cpu(p) for p in pids], machine_busy_s()
        pre = [(preemptions(p) - b) / steps for p, b in zip(pids, pre0)]
        tms = ex.stage_timings()
        messages = (messages_between_actors(ex) - sent0) / steps
        parts = [cpu_parts(tm) for tm in tms]  # the actors' own account
        compute = sum(p["compute"] for p in parts)
        in_plane = sum(p.get("plane", 0.0) for p in parts)
        in_run = sum(tm.get("run_cpu", 0.0) for tm in tms)
        gloo = sum(a.get("gloo_tcp_loop", 0) - b.get("gloo_tcp_loop", 0)
                   for a, b in zip(after, before))
        main = sum(a.get(MAIN, 0) - b.get(MAIN, 0) for a, b in zip(after, before))
        actor = sum(sum(a.values()) - sum(b.values()) for a, b in zip(after, before))
        cpu = {"machine": (m1 - m0) / steps, "compute": compute / steps,
               "main_other": (main - compute) / steps,
               # main_other split: the data plane's send and recv; the interpreter, the
               # messages' framing and checks; outside the batch calls (Ray's task
               # machinery, the coordinator's other calls)
               "main_plane": in_plane / steps,
               "main_interpreter": (in_run - compute - in_plane) / steps,
               "main_calls": (main - in_run) / steps, "gloo_io": gloo / steps,
               "actor_rest": (actor - main - gloo) / steps,
               "outside_actors": (m1 - m0 - actor) / steps}
        actors = [private_mb(i["pid"]) for i in ex.stage_info]
        heaps = ray.get([w.__ray_call__.remote(_heap) for w in ex.workers], timeout=120)
        out = {"samples_per_s": cfg.train.batch_size / statistics.median(t),
               "startup_s": ex.startup_s, "actors": ex.num_stages,
               "actor_private_mb": round(statistics.median(actors), 1),
               "actor_private_mb_max": round(max(actors), 1), "baseline_mb": round(base_mb, 1),
               # every actor, in stage order, with malloc's books: which ones hold the most
               "actor_private_mb_each": [round(a, 1) for a in actors],
               "actor_heap_mb_each": heaps,
               "actor_private_setup_mb": round(statistics.median(setup), 1),
               # malloc's books of the median actor, between batches
               "actor_heap_mb": {k: round(statistics.median(h[k] for h in heaps), 1)
                                 for k in heaps[0]}
               if all(heaps) else None,
               # + 0.0: a difference that rounds to zero from below prints as 0.0, not -0.0
               "cpu_per_batch": {k: round(v, 3) + 0.0 for k, v in cpu.items()},
               "messages_per_batch": round(messages, 1),
               # the simulator on this run's own costs: each actor's compute per action,
               # and all the rest of the machine's CPU spread over the messages
               "simulated_profiled": round(profiled(cfg, tms, steps, messages,
                                                    (m1 - m0) / steps - compute / steps), 1),
               # the median actor's main thread: preempted while runnable, per batch
               "preemptions_per_batch": round(statistics.median(pre), 1),
               # what the actors ran (rr falls back to batch where the kernel refuses it)
               "cpu_policy": ",".join(sorted({str(i.get("cpu_policy")) for i in ex.stage_info})),
               "allocators": sorted({str(i.get("allocator")) for i in ex.stage_info}),
               "memory_estimate": ex.memory}
    finally:
        ex.close()
    out["peak_used_mb"], out["idle_used_mb"] = round(peak.stop()), round(idle_mb)
    return out


def bounds(inprocess_s: float, cpu: dict, cores: int | None = None) -> dict:
    """The most Ray ÷ in-process could be on this run's CPU account, if the Ray run kept
    every core busy: the in-process run's seconds per batch against the Ray run's CPU
    per batch spread over the cores -- as measured ("all"), without the data plane's CPU
    (its main-thread send and recv, and gloo's socket threads: "free plane"), and with
    only the actors' compute ("compute only").  The gap between the first two is the
    most any data plane could give back; between the last two, what the rest costs."""
    cores = cores or os.cpu_count() or 1
    plane = cpu["main_plane"] + cpu["gloo_io"]
    need = {"all": cpu["machine"], "free_plane": cpu["machine"] - plane,
            "compute_only": cpu["compute"]}
    return {k: round(inprocess_s * cores / v, 3) for k, v in need.items() if v > 0}


def predicted(cfg, hop_cost: float, per_mib: float) -> float:
    """A priori: every unit timed alone in-process, a message's CPU from the data plane's
    hop (a frame's cost plus its payload's MiB)."""
    from localnet.runtime.plan import simulate_config

    plan = simulate_config(cfg, SHAPE, NC, repeats=2, cores=os.cpu_count() or 1,
                           hop_cost=hop_cost, hop_cost_per_mib=per_mib)
    return plan["samples_per_s"]


def profiled(cfg, timings: list[dict], steps: int, messages: float, rest_cpu: float) -> float:
    """The simulator on a run's own costs -- each actor's mean compute CPU per forward,
    backward and update, and the rest of the machine's CPU per batch (data plane,
    interpreter, Ray, driver) charged per message -- so that what is left between it and
    the run is the simulator's model of the schedule on shared cores."""
    from localnet.runtime.plan import simulate_config

    def mean(tm, op):
        v = tm[f"{op}_cpu"]
        return sum(v) / len(v) if v else 0.0

    plan = simulate_config(cfg, SHAPE, NC, fwd=[mean(t, "forward") for t in timings],
                           bwd=[mean(t, "backward") for t in timings],
                           step=[mean(t, "update") for t in timings],
                           cores=os.cpu_count() or 1,
                           hop_cost=rest_cpu / messages if messages else 0.0)
    return plan["samples_per_s"]


def messages_between_actors(ex) -> int:
    """Activations and errors sent from actor to actor so far (the ledger's count)."""
    return sum(row[0] for (src, dst, kind), row in ex.ledger().rows.items()
               if kind in ("activation", "error") and "driver" not in (src, dst))


# ------------------------------------------------------------------------------ projection
def gpu_cost(flops: float, tflops: float = 50.0, launch_s: float = 20e-6) -> float:
    """Seconds for a layer's forward (or backward: twice the FLOPs) on one GPU: its
    FLOPs at a sustained `tflops` plus a fixed launch cost per pass."""
    return flops / (tflops * 1e12) + launch_s


def projection(batch: int, M: int, hop_s: float, sizes=(1, 2, 4, 8, 16, 32, 64)) -> list[dict]:
    """ResNet-56 per layer on 1..56 GPU actors (consecutive layers grouped; 56 layers, so
    64 actors means one layer each), 1f1b, at M and at 4x M micro-batches of the same
    size (a larger batch)."""
    from localnet.builders import build_rule_and_model
    from localnet.schedules import make_schedule, simulate

    cfg = cfg_for("resnet56", "per_layer", batch, M)
    _, model = build_rule_and_model(cfg, SHAPE, NC)
    nodes = model.layer_graph()
    flops, outs, x = [], [], torch.zeros(1, *SHAPE)
    for n in nodes:  # FLOPs per sample of each layer's conv / linear
        ins = [x if i < 0 else outs[i] for i in n.inputs]
        f = 0
        with torch.no_grad():
            y = n.module(*ins)
        outs.append(y)
        for m in n.module.modules():
            w = getattr(m, "weight", None)
            if w is not None and w.dim() == 4:
                f += 2 * w.numel() * y.shape[-1] * y.shape[-2]
            elif w is not None and w.dim() == 2:
                f += 2 * w.numel()
        flops.append(f)
    mb = batch // M
    rows = []
    for S in sorted({min(S, len(nodes)) for S in sizes}):
        cuts = [round(i * len(nodes) / S) for i in range(S + 1)]
        fwd = [sum(gpu_cost(mb * f) for f in flops[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        bwd = [2 * v for v in fwd]
        row = {"actors": S, "stage_fwd_ms": max(fwd) * 1e3}
        for k, tag in ((1, ""), (4, "_4x")):
            res = simulate(make_schedule("1f1b", S, M * k), fwd, bwd, comm_cost=hop_s,
                           hop_cost=hop_s, batch_size=batch * k)
            row["samples_per_s" + tag], row["bubble" + tag] = res.samples_per_s, res.bubble_fraction
        rows.append(row)
    return rows


def plot(rows: list[dict], proj: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for part, marker in (("per_unit", "o"), ("per_layer", "s")):
        pts = [r for r in rows if r["partition"] == part and "ray" in r and "samples_per_s" in r["ray"]]
        a.plot([r["ray"]["actors"] for r in pts], [r["ray"]["samples_per_s"] for r in pts],
               marker=marker, label=f"Ray, {part}")
        a.plot([r["ray"]["actors"] for r in pts], [r["predicted"] for r in pts],
               marker=marker, linestyle=":", label=f"simulator, {part}")
    for r in rows:
        if r["partition"] == "per_unit":
            a.axhline(r["inprocess"], color="grey", linewidth=0.5)
    a.set_xlabel("actors")
    a.set_ylabel("samples/s (2 CPU cores)")
    a.set_title("this machine (grey: in-process)")
    a.legend(fontsize=7)
    b.plot([p["actors"] for p in proj], [p["samples_per_s"] for p in proj], marker="o",
           label="4 micro-batches")
    b.plot([p["actors"] for p in proj], [p["samples_per_s_4x"] for p in proj], marker="s",
           label="16 micro-batches (4x batch)")
    b.legend(fontsize=7)
    b.set_xscale("log", base=2)
    b.set_xlabel("GPU actors (ResNet-56, consecutive layers per actor)")
    b.set_ylabel("samples/s (simulated)")
    b.set_title("projection: one GPU per actor")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet32,resnet56")
    p.add_argument("--partitions", default="per_unit,per_layer")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hop-cost", type=float, default=1.4e-4,
                   help="the data plane's CPU per message for the a-priori simulator (s): "
                        "benchmarks/dataplane.py's localnet row at 4 KiB")
    p.add_argument("--hop-cost-per-mib", type=float, default=4.9e-4,
                   help="... plus this per MiB of payload (s): the same row, 4 KiB to 4 MiB")
    p.add_argument("--cpu-policy", choices=POLICIES, default=None,
                   help="runtime.cpu_policy of the actors (default: the config's)")
    p.add_argument("--allocator", choices=["jemalloc", "glibc"], default=None,
                   help="runtime.allocator of the actors (default: the config's)")
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"], default=None,
                   help="train.memory_format of both executors (default: the config's)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--baseline", action="store_true",
                   help="only a bare torch actor's memory, what torch._dynamo adds, and "
                        "the CPU an actor spends to get ready")
    args = p.parse_args(argv)
    if args.baseline:
        r = baseline(not args.no_write)
        print(json.dumps(r))
        return r
    import ray

    data = batches(args.batch)
    rows = []
    for model in args.models.split(","):
        for part in args.partitions.split(","):
            cfg = cfg_for(model, part, args.batch, args.micro, args.cpu_policy,
                          args.memory_format, args.allocator)
            rate, cpu = inprocess(cfg, data, args.steps)
            gc.collect()
            release_free_memory()  # not the in-process run's peak in the Ray run's
            row = {"model": model, "partition": part, "inprocess": round(rate, 1),
                   "inprocess_cpu_per_batch": round(cpu, 3),
                   "predicted": round(predicted(cfg, args.hop_cost, args.hop_cost_per_mib), 1)}
            row["ray"] = on_ray(cfg, data, args.steps)
            if "samples_per_s" in row["ray"]:
                row["ray"]["samples_per_s"] = round(row["ray"]["samples_per_s"], 1)
                row["ratio"] = round(row["ray"]["samples_per_s"] / row["inprocess"], 3)
                row["bounds"] = bounds(args.batch / rate, row["ray"]["cpu_per_batch"])
            print(json.dumps(row), flush=True)
            rows.append(row)
            if ray.is_initialized():
                ray.shutdown()
    proj = projection(args.batch, args.micro, 1e-4)
    result = {"hardware": hardware_cpu(), "commit": commit(), "rows": rows, "projection": proj,
              "command": "python benchmarks/scaling.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(result))
    if not args.no_write:
        plot(rows, proj, HERE / "scaling.png")
        write_results(result, args)
    return result


def rewrite(log: str) -> None:
    """Redo the projection, plot and RESULTS section of a saved run (its last line)."""
    r = json.loads(Path(log).read_text().strip().splitlines()[-1])
    r["projection"] = projection(128, 4, 1e-4)
    args = argparse.Namespace(batch=128, micro=4)
    plot(r["rows"], r["projection"], HERE / "scaling.png")
    write_results(r, args)


def _heap_cell(ray_: dict) -> str:
    h = ray_.get("actor_heap_mb")  # absent in runs saved before it was measured
    return f"{h['live']:.1f} / {h['kept']:.1f}" if h else "—"


def _bounds_cell(row: dict) -> str:
    b = row.get("bounds") or {}
    return " / ".join(str(b.get(k, "-")) for k in ("all", "free_plane", "compute_only"))


def _allocators(r: dict) -> list[str]:
    return sorted({a for row in r["rows"] for a in row["ray"].get("allocators") or []}) or ["?"]


def write_results(r: dict, args) -> None:
    lines = ["### Scaling: CIFAR ResNets per unit and per layer, every actor a process", "",
             f"Hardware: {r['hardware']}.  Commit `{r['commit']}`.  Command: "
             f"`{r['command'].strip()}`.  PFA, 1f1b, batch {args.batch} in {args.micro} "
             f"micro-batches, synthetic CIFAR-shaped input; Ray: one torch thread per actor, "
             f"an embedded Ray per row; in-process: {os.cpu_count()} threads.  Memory: the "
             f"machine's peak used memory during the Ray run (and before it); an actor's "
             f"private memory (smaps_rollup) against a bare Ray actor that imports torch, "
             f"measured in the same run and killed before the steps (not in the peak); "
             f"the actors' malloc ({', '.join(_allocators(r))}; the bare actor's the same) "
             f"and its books (`alloc.heap_mb`) of the median actor between batches: live, "
             f"and kept free for the next batch's peak.", "",
             "| model | partition | actors | in-process samples/s | Ray samples/s | Ray ÷ "
             "in-process | simulator: a priori / on the run's profile | start-up (s) | peak used GB (idle) | actor private "
             "MB, median / max | bare torch actor MB | above it after set-up / after the steps "
             "(median) | malloc between batches: live / kept free (median MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        ray_ = row["ray"]
        if "refused" in ray_:
            lines.append(f"| {row['model']} | {row['partition']} | — | {row['inprocess']} | "
                         f"refused by the preflight | — | {row['predicted']} | — | — | — | — | — | — |")
            continue
        lines.append(
            f"| {row['model']} | {row['partition']} | {ray_['actors']} | {row['inprocess']} | "
            f"{ray_['samples_per_s']} | {row['ratio']} | {row['predicted']} / "
            f"{ray_.get('simulated_profiled', '-')} | "
            f"{ray_['startup_s']:.1f} | {ray_['peak_used_mb'] / 1024:.1f} "
            f"({ray_['idle_used_mb'] / 1024:.1f}) | {ray_['actor_private_mb']} / "
            f"{ray_['actor_private_mb_max']} | {ray_['baseline_mb']} | "
            f"{ray_['actor_private_setup_mb'] - ray_['baseline_mb']:.1f} / "
            f"{ray_['actor_private_mb'] - ray_['baseline_mb']:.1f} | {_heap_cell(ray_)} |")
    cpu_rows = [row for row in r["rows"] if "cpu_per_batch" in row["ray"]]
    if cpu_rows:
        lines += ["", "Where the CPU goes, seconds per batch over the timed steps (the "
                      "machine's busy time from /proc/stat; actors' threads from "
                      "/proc/PID/task): *compute* is the forward, backward and update calls' "
                      "own thread time (StageTimer); *main, other* the rest of an actor's main "
                      "thread, split by the actor's own account (`StageWorker.timings`) into "
                      "*plane* (the data plane's send and recv in the main thread), "
                      "*interpreter* (the action lists, the messages' framing and checks) "
                      "and *Ray calls* (outside the batch calls: Ray's task machinery); "
                      "*gloo I/O* gloo's socket threads; *outside* the driver, Ray's own "
                      "processes and the rest of the machine.  *At most*: the in-process "
                      "run's seconds per batch against the Ray run's CPU per batch spread "
                      "over every core (`bounds`): as measured, without the data plane's "
                      "CPU (plane and gloo I/O), and with only the actors' compute.", "",
                  "| model | partition | in-process CPU | Ray: machine | compute | main, "
                  "other | of which plane / interpreter / Ray calls | gloo I/O | other actor "
                  "threads | outside the actors | Ray ÷ in-process at most: as measured / "
                  "free data plane / compute only |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in cpu_rows:
            c = row["ray"]["cpu_per_batch"]
            split = " / ".join(str(c.get(k, "-")) for k in
                               ("main_plane", "main_interpreter", "main_calls"))
            lines.append(f"| {row['model']} | {row['partition']} | "
                         f"{row.get('inprocess_cpu_per_batch', '-')} | {c['machine']} | "
                         f"{c['compute']} | {c['main_other']} | {split} | {c['gloo_io']} | "
                         f"{c['actor_rest']} | {c['outside_actors']} | {_bounds_cell(row)} |")
    refused = [row for row in r["rows"] if "refused" in row["ray"]]
    for row in refused:
        lines += ["", f"{row['model']} {row['partition']}: {row['ray']['refused']}"]
    lines += ["", "Projection (simulated, `gpu_cost`: FLOPs at 50 TFLOP/s plus 20 us per layer "
                  "and pass, backward twice the forward, 0.1 ms per hop): ResNet-56 per "
                  "layer, consecutive layers grouped onto N GPU actors, 1f1b, "
                  f"{args.micro} micro-batches of {args.batch // args.micro}.", "",
              f"| GPU actors | samples/s, M={args.micro} | bubble | samples/s, M={4 * args.micro} "
              "(4x the batch) | bubble | slowest stage's forward per micro-batch (ms) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for p in r["projection"]:
        lines.append(f"| {p['actors']} | {p['samples_per_s']:.0f} | {p['bubble']:.2f} | "
                     f"{p['samples_per_s_4x']:.0f} | {p['bubble_4x']:.2f} | "
                     f"{p['stage_fwd_ms']:.3f} |")
    lines += ["", "![scaling](scaling.png)"]
    write_section("scaling", lines)


if __name__ == "__main__":
    main()
