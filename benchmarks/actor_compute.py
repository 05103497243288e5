"""Why an actor's compute costs more CPU than the same layers in one process.

    python benchmarks/actor_compute.py                    # ResNet-20 per unit, 8 steps
    python benchmarks/actor_compute.py --partition per_layer

The same training work (PFA, 1f1b, batch 128 in 4 micro-batches, synthetic CIFAR-shaped
input, one torch thread everywhere), its CPU seconds per batch measured four ways in one
run:

  alone        the in-process executor, one thread, the other core idle
  side by side two such processes at once: what a CPU-second buys when both cores are
               busy (memory bandwidth, shared caches, the hypervisor)
  local        the actors' own code in this process (`executor: local`): the
               forward/backward/update calls only (StageTimer), then everything
  ray          the same calls in Ray actors, 11 or 20 processes sharing the 2 cores,
               each actor's calls summed (scaling.py's breakdown)

If `ray`'s compute exceeds `side by side`, the rest is what running many processes on
few cores costs the computation itself: each actor resumes with caches another actor
filled.  No transport can remove that part; fewer processes per core can.
Prints a table and its JSON (quote them with this command and the commit).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys

from scaling import NC, SHAPE, batches, cfg_for, inprocess, on_ray, step_times  # Ray's env

import torch  # noqa: E402

from common import commit, hardware_cpu  # noqa: E402
from localnet.timing import OPS  # noqa: E402


def cfg(partition: str, fmt: str):
    return cfg_for("resnet20", partition, 128, 4, memory_format=fmt)


def inprocess_cpu(partition: str, steps: int, fmt: str) -> float:
    """CPU seconds per batch of the in-process executor at one thread (in a child:
    `side by side` runs two at once)."""
    return inprocess(cfg(partition, fmt), batches(128), steps, threads=1)[1]


def local_cpu(partition: str, steps: int, fmt: str) -> tuple[float, float]:
    """(compute calls, everything) CPU seconds per batch of `executor: local`."""
    from localnet.runtime.ray_executor import RayExecutor

    torch.set_num_threads(1)
    ex = RayExecutor(cfg(partition, fmt), SHAPE, NC, local=True)
    try:
        step = lambda x, y: ex.train_step(x, y, 0.01, 1e-4)  # noqa: E731
        data = batches(128)
        step_times(step, data, 3, 0)
        ex.stage_timings()  # clears them
        cpu: list[float] = []
        step_times(step, data, 0, steps, cpu)
        compute = sum(sum(t[f"{op}_cpu"]) for t in ex.stage_timings() for op in OPS)
    finally:
        ex.close()
    return compute / steps, cpu[0]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partition", default="per_unit", choices=["per_unit", "per_layer"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"],
                   default="channels_last", help="train.memory_format everywhere")
    args = p.parse_args(argv)
    run = (args.partition, args.steps, args.memory_format)
    spawn = mp.get_context("spawn")  # fresh processes: no state shared with this one
    with spawn.Pool(1) as pool:
        alone = pool.apply(inprocess_cpu, run)
    with spawn.Pool(2) as pool:
        pair = pool.starmap(inprocess_cpu, [run] * 2)
    with spawn.Pool(1) as pool:
        compute, total = pool.apply(local_cpu, run)
    import ray

    try:
        ray_ = on_ray(cfg(args.partition, args.memory_format), batches(128), args.steps)
    finally:
        ray.shutdown()
    c = ray_["cpu_per_batch"]
    r = {"hardware": hardware_cpu(), "commit": commit(), "partition": args.partition,
         "memory_format": args.memory_format,
         "actors": ray_["actors"], "alone": round(alone, 3),
         "side_by_side": round(sum(pair) / 2, 3), "local_compute": round(compute, 3),
         "local_all": round(total, 3), "ray_compute": c["compute"], "ray_machine": c["machine"],
         "command": " ".join(["python benchmarks/actor_compute.py", *(argv or sys.argv[1:])])}
    print(f"ResNet-20 {args.partition} ({r['actors']} actors, {args.memory_format}), CPU "
          f"seconds per batch, one "
          f"torch thread each:\n\n| in-process, alone | two in-process at once (each) | "
          f"local: compute / all | Ray actors: compute / machine |\n| --- | --- | --- | --- |\n"
          f"| {r['alone']} | {r['side_by_side']} | {r['local_compute']} / {r['local_all']} | "
          f"{r['ray_compute']} / {r['ray_machine']} |\n")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
