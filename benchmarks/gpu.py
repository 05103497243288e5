"""One GPU: plain PyTorch backprop, localnet's rules in-process, and Ray actors sharing it.

    python benchmarks/gpu.py                          # ResNet-20, batch 128, CUDA
    python benchmarks/gpu.py --no-ray                 # a machine without Ray
    python benchmarks/gpu.py --device cpu --steps 3 --no-write    # a dry run anywhere

Three rows, images/s of training steps on CIFAR-shaped synthetic input (nothing to
download), each the median step time after a warm-up, with torch.cuda.synchronize()
around every timed step:

  plain      the same ResNet built from stock nn.Conv2d / nn.Linear (rule=None), stock
             torch.optim.SGD -- the baseline every other row is divided by
  in-process localnet's InProcessExecutor with each rule (default: bp and pfa), the model
             and every batch on the GPU (`train.device: cuda`); the batch comes from
             pinned memory in one asynchronous copy, as `localnet run` does
  ray        RayExecutor, per_unit, its actors sharing the one GPU through fractional
             `runtime.num_gpus` (1 / actors each); actors on one GPU cannot form NCCL
             pairs, so activations and errors cross through host memory over the gloo
             data plane (on several GPUs they would stay on the devices), and this row
             measures the runtime's overhead on a GPU, not a multi-GPU speed-up

The issue's target: in-process PFA at >= 0.85x plain BP's images/s.  Results go to
benchmarks/RESULTS.md between <!-- gpu --> markers (--no-write: not).

The GPU machine has torch but not Ray.  To carry Ray there, build wheels on this machine
and install them beside the checkout before running:

    pip download 'ray[default]' msgpack pydantic pyyaml rich prometheus-client -d wheels/
    # on the GPU machine (no network):
    pip install --no-index --find-links wheels/ 'ray[default]' && pip install --no-deps -e .

`wheels/` and the data are ignored by git, so the device tool must be told to carry them.
Without Ray, `--no-ray` runs the first two rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import commit, write_section  # noqa: E402

SHAPE, NC = (3, 32, 32), 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, x, y, device, warmup: int, steps: int) -> float:
    """Median seconds of step(x, y), the batch copied from pinned memory each time."""
    out = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        step(x, y)
        _sync(device)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def plain(model_name: str, device, batch, warmup, steps) -> float:
    from localnet.models import build_model

    model = build_model(model_name, None, SHAPE, NC).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch / timed(step, *data(batch, device), device, warmup, steps)


def inprocess(model_name: str, rule: str, device, batch, warmup, steps) -> float:
    from localnet.engine import InProcessExecutor, OptimConfig
    from localnet.models import build_model
    from localnet.rules import make_rule

    model = build_model(model_name, make_rule(rule), SHAPE, NC)
    ex = InProcessExecutor(model, OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4),
                           device=device)
    return batch / timed(lambda x, y: ex.train_step(x, y, 0.1, 1e-4), *data(batch, device),
                         device, warmup, steps)


def on_ray(model_name: str, rule: str, device, batch, micro, warmup, steps) -> dict:
    import ray

    from localnet.config import Config
    from localnet.runtime.ray_executor import RayExecutor

    from localnet.models import build_model

    units = len(build_model(model_name, None, SHAPE, NC).units)
    gpus = device.type == "cuda"
    cfg = Config.model_validate({
        "rule": {"name": rule}, "model": {"name": model_name}, "data": {"name": "synthetic"},
        "train": {"batch_size": batch, "micro_batches": micro},
        "runtime": {"executor": "ray", "schedule": "1f1b", "partition": "per_unit",
                    "num_gpus": round(1 / units, 4) if gpus else 0, "timeout_s": 600}})
    if gpus:  # one GPU shared by all actors: Ray must be told it has it
        ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
    ex = RayExecutor(cfg, SHAPE, NC)
    try:
        x, y = data(batch, torch.device("cpu"))  # the driver sends from host memory
        t = timed(lambda a, b: ex.train_step(a, b, 0.1, 1e-4), x, y, torch.device("cpu"),
                  warmup, steps)
        return {"samples_per_s": batch / t, "actors": ex.num_stages,
                "startup_s": round(ex.startup_s, 1)}
    finally:
        ex.close()
        if ray.is_initialized():
            ray.shutdown()


def data(batch: int, device):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *SHAPE, generator=g), torch.randint(0, NC, (batch,), generator=g)
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--rules", default="bp,pfa")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--micro", type=int, default=4, help="micro-batches (the Ray row)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu.py: torch sees no GPU here; --device cpu runs the same rows on the CPU")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    rules = args.rules.split(",")
    res = {"plain": plain(args.model, device, args.batch, args.warmup, args.steps)}
    for r in rules:
        res[f"inprocess:{r}"] = inprocess(args.model, r, device, args.batch, args.warmup,
                                          args.steps)
    ray_rows = {}
    if not args.no_ray:
        for r in rules:
            ray_rows[r] = on_ray(args.model, r, device, args.batch, args.micro, args.warmup,
                                 args.steps)
    hw = (torch.cuda.get_device_name(device) if device.type == "cuda"
          else f"CPU, {os.cpu_count()} cores")
    out = {"device": hw, "torch": torch.__version__, "commit": commit(), "model": args.model,
           "batch": args.batch, "images_per_s": {k: round(v, 1) for k, v in res.items()},
           "ratio_to_plain": {k: round(v / res["plain"], 3) for k, v in res.items()},
           "ray": ray_rows, "command": "python benchmarks/gpu.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(out))
    if not args.no_write:
        lines = ["### One GPU: plain PyTorch, the rules in-process, Ray actors sharing it", "",
                 f"Device: {hw}, torch {torch.__version__}.  Commit `{out['commit']}`.  "
                 f"Command: `{out['command'].strip()}`.  {args.model}, batch {args.batch}, "
                 f"synthetic CIFAR-shaped input, median of {args.steps} steps after "
                 f"{args.warmup}.", "",
                 "| row | images/s | ÷ plain PyTorch BP |", "| --- | --- | --- |"]
        for k, v in res.items():
            lines.append(f"| {k} | {v:.1f} | {v / res['plain']:.3f} |")
        for r, row in ray_rows.items():
            lines.append(f"| ray:{r} ({row['actors']} actors sharing the device, "
                         f"{args.micro} micro-batches) | {row['samples_per_s']:.1f} | "
                         f"{row['samples_per_s'] / res['plain']:.3f} |")
        write_section("gpu", lines)
    return out


if __name__ == "__main__":
    main()
