"""One GPU: plain PyTorch backprop, localnet's rules in-process, and Ray actors sharing it.

    python benchmarks/gpu.py                          # ResNet-20 and -18, batch 128, CUDA
    python benchmarks/gpu.py --no-ray                 # a machine without Ray
    python benchmarks/gpu.py --device cpu --models resnet8 --steps 3 --no-write   # anywhere

Rows of images/s of training steps on CIFAR-shaped synthetic input (nothing to
download), each the median step time after a warm-up, with torch.cuda.synchronize()
around every timed step:

  plain        the same ResNet built from stock nn.Conv2d / nn.Linear (rule=None), stock
               torch.optim.SGD -- the baseline every other row is divided by
  plain:graph  plain, captured whole as one CUDA graph the way PyTorch's docs do it:
               the fair baseline for captured steps (GPU only)
  inprocess:R  localnet's InProcessExecutor under rule R (default: bp and pfa), the model
               and every batch on the GPU (`train.device: cuda`), each step captured as
               a CUDA graph (`train.cuda_graph`, localnet/graphs.py): what `localnet
               run` does on a GPU.  The batch comes from pinned memory in one copy
  inprocess:R:eager  the same with every kernel launched from Python (GPU only)
  ray:R        RayExecutor, per_unit, its actors sharing the one GPU through fractional
               `runtime.num_gpus` (1 / actors each); actors on one GPU cannot form NCCL
               pairs, so activations and errors cross through host memory over the gloo
               data plane (on several GPUs they would stay on the devices), and this row
               measures the runtime's overhead on a GPU, not a multi-GPU speed-up

Then a check (GPU, `--no-check` skips it): captured and eager steps from one seed, on
the same batches, must leave the same weights (`graph_check`).

The issue's target: in-process PFA at >= 0.85x plain BP's images/s.  Results go to
benchmarks/RESULTS.md between <!-- gpu --> markers (--no-write: not).

The GPU machine has torch but not Ray (nor pydantic).  Carry them as wheels for its
Python, downloaded on a machine with network access, and install them beside the checkout:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl ray==2.60.0 pydantic pydantic-core \
        annotated-types typing-inspection jsonschema jsonschema-specifications referencing rpds-py
    # on the GPU machine (no network):
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python benchmarks/gpu.py --json out.json --profile out/

Ray's wheel is about 80 MB, most of it Java (`ray/jars`) and the dashboard's web client,
which these rows never use; a transfer with a size limit can carry it without them (drop
those members from the zip and from its RECORD).  PYTHONPATH reaches Ray's workers, so the
actors import the same localnet.  Without Ray, `--no-ray` runs the in-process rows.
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


def profiled(step, x, y, device, steps: int, path: Path) -> None:
    """torch.profiler over `steps` steps: the ops by their own CPU time, and the kernels
    launched per step -- on a GPU, a small network's step is bound by its launches."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step(x, y)
        _sync(device)
    ev = prof.key_averages()
    kernels = sum(e.count for e in ev if getattr(e, "device_type", None) is not None
                  and "CUDA" in str(e.device_type))
    path.write_text(f"kernels per step: {kernels / steps:.0f}\n\n"
                    + ev.table(sort_by="self_cpu_time_total", row_limit=40))


def plain(model_name: str, device):
    """A training step of the stock-module ResNet and stock SGD."""
    from localnet.models import build_model

    model = build_model(model_name, None, SHAPE, NC).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def plain_graph(model_name: str, device):
    """plain(), captured whole as a CUDA graph the way PyTorch's docs capture a network
    (warm-up on a side stream, then forward, backward and step in one graph): the fair
    baseline for localnet's captured steps."""
    from localnet.models import build_model

    model = build_model(model_name, None, SHAPE, NC).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    state = {}

    def work():
        F.cross_entropy(model(state["x"]), state["y"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step(x, y):
        if "replay" not in state:
            state["x"], state["y"] = x.to(device), y.to(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    work()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                work()
            state["replay"] = graph.replay
        state["x"].copy_(x, non_blocking=True)
        state["y"].copy_(y, non_blocking=True)
        state["replay"]()
    return step


def executor(model_name: str, rule: str, device, cuda_graph: bool = True, seed: int = 0):
    from localnet.engine import InProcessExecutor, OptimConfig
    from localnet.models import build_model
    from localnet.rules import make_rule

    model = build_model(model_name, make_rule(rule), SHAPE, NC, seed=seed)
    return InProcessExecutor(model, OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4),
                             device=device, cuda_graph=cuda_graph)


def inprocess(model_name: str, rule: str, device, cuda_graph: bool = True):
    """A training step of localnet's in-process executor under `rule`, as `localnet run`
    takes it: captured as a CUDA graph on a GPU unless cuda_graph is False."""
    ex = executor(model_name, rule, device, cuda_graph)
    return lambda x, y: ex.train_step(x, y, 0.1, 1e-4)


def graph_check(model_name: str, rule: str, device, steps: int = 20) -> dict:
    """Captured steps against eager ones, from one seed, on the same batches and a
    learning rate that changes every step: the largest weight difference, beside the
    one between two eager runs (cuDNN kept deterministic for both)."""
    det = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        runs = [executor(model_name, rule, device, g) for g in (False, False, True)]
        g = torch.Generator().manual_seed(1)
        for i in range(steps):
            x, y = torch.randn(128, *SHAPE, generator=g), torch.randint(0, NC, (128,), generator=g)
            for ex in runs:
                ex.train_step(x, y, 0.1 / (1 + i), 1e-4)
        states = [{k: v for k, v in ex.model.state_dict().items()
                   if torch.is_tensor(v) and v.is_floating_point()} for ex in runs]

        def diff(a, b):
            return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        return {"steps": steps, "replayed": runs[2].graphs is not None,
                "eager_vs_eager": diff(states[0], states[1]),
                "graph_vs_eager": diff(states[0], states[2]),
                "weight_scale": max(v.abs().max().item() for v in states[0].values())}
    finally:
        torch.backends.cudnn.deterministic = det


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
        ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False,
                 object_store_memory=2 << 30)  # not 30% of the RAM: /dev/shm may be small
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


def one_model(model: str, rules: list[str], device, args) -> dict:
    """The rows of one model: images/s, each row's ratio to plain BP, the Ray rows."""
    x, y = data(args.batch, device)
    builds = {"plain": lambda: plain(model, device)}
    if device.type == "cuda":
        builds["plain:graph"] = lambda: plain_graph(model, device)
    builds.update({f"inprocess:{r}": (lambda r=r: inprocess(model, r, device)) for r in rules})
    if device.type == "cuda":
        builds.update({f"inprocess:{r}:eager": (lambda r=r: inprocess(model, r, device, False))
                       for r in rules})
    res = {}
    for row, build in builds.items():
        step = build()
        res[row] = args.batch / timed(step, x, y, device, args.warmup, args.steps)
        print(f"{model} {row}: {res[row]:.1f} images/s", flush=True)
        if args.profile:
            profiled(step, x, y, device, 5, Path(args.profile) / f"profile-{model}-{row.replace(':', '-')}.txt")
        del step
    ray_rows = {}
    if not args.no_ray and model in args.ray_models.split(","):
        for r in rules:
            try:
                ray_rows[r] = on_ray(model, r, device, args.batch, args.micro, args.warmup,
                                     args.steps)
            except Exception as exc:  # noqa: BLE001 -- one row's failure is a result too
                ray_rows[r] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            print(f"{model} ray:{r}: {ray_rows[r]}", flush=True)
    check = None
    if device.type == "cuda" and args.check:
        check = graph_check(model, rules[-1], device)
        print(f"{model} graph check ({rules[-1]}): {check}", flush=True)
    return {"images_per_s": {k: round(v, 1) for k, v in res.items()}, "graph_check": check,
            "ratio_to_plain": {k: round(v / res["plain"], 3) for k, v in res.items()},
            "ray": ray_rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet18")
    p.add_argument("--rules", default="bp,pfa")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--micro", type=int, default=4, help="micro-batches (the Ray row)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--ray-models", default="resnet20", help="the models with Ray rows")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler table per row")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing captured steps with eager ones (GPU)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu.py: torch sees no GPU here; --device cpu runs the same rows on the CPU")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    rules = args.rules.split(",")
    hw = (torch.cuda.get_device_name(device) if device.type == "cuda"
          else f"CPU, {os.cpu_count()} cores")
    out = {"device": hw, "torch": torch.__version__, "commit": os.environ.get(
               "LOCALNET_COMMIT", commit()), "batch": args.batch,
           "command": "python benchmarks/gpu.py " + " ".join(argv or sys.argv[1:]), "models": {}}
    for model in args.models.split(","):
        out["models"][model] = one_model(model, rules, device, args)
        if args.json:  # after each model: a later failure keeps the rows before it
            Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    if not args.no_write:
        write_section("gpu", report(out, args))
    return out


def report(out: dict, args) -> list[str]:
    lines = ["### One GPU: plain PyTorch, the rules in-process, Ray actors sharing it", "",
             f"Device: {out['device']}, torch {out['torch']}.  Commit `{out['commit']}`.  "
             f"Command: `{out['command'].strip()}`.  Batch {args.batch}, synthetic "
             f"CIFAR-shaped input, median of {args.steps} steps after {args.warmup}.  "
             "`inprocess:<rule>` is the step as `localnet run` takes it on a GPU, captured "
             "as a CUDA graph (`train.cuda_graph`); `:eager` launches every kernel; "
             "`plain:graph` is plain PyTorch captured the same way.", "",
             "| model | row | images/s | ÷ plain PyTorch BP | ÷ plain, captured |",
             "| --- | --- | --- | --- | --- |"]
    for model, res in out["models"].items():
        ips = res["images_per_s"]
        plain_ips, graphed = ips["plain"], ips.get("plain:graph")
        for k, v in ips.items():
            vs_graph = f"{v / graphed:.3f}" if graphed else ""
            lines.append(f"| {model} | {k} | {v:.1f} | {res['ratio_to_plain'][k]:.3f} | {vs_graph} |")
        for r, row in res["ray"].items():
            if "error" in row:
                lines.append(f"| {model} | ray:{r} | failed: {row['error']} | | |")
                continue
            lines.append(f"| {model} | ray:{r} ({row['actors']} actors sharing the device, "
                         f"{args.micro} micro-batches, start-up {row['startup_s']} s) | "
                         f"{row['samples_per_s']:.1f} | {row['samples_per_s'] / plain_ips:.3f} | |")
    for model, res in out["models"].items():
        c = res.get("graph_check")
        if c:
            lines += ["", f"{model}, captured against eager steps ({c['steps']} steps, the "
                      f"learning rate changing every step, cuDNN deterministic): largest "
                      f"weight difference {c['graph_vs_eager']:.3g}, against "
                      f"{c['eager_vs_eager']:.3g} between two eager runs (weights up to "
                      f"{c['weight_scale']:.3g})."]
    return lines


if __name__ == "__main__":
    main()
