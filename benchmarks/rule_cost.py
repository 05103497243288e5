"""Cost of one SGD step of each rule, relative to plain backprop.

    python benchmarks/rule_cost.py [--model resnet20] [--batch 128] [--repeats 15] [--threads 2]
    python benchmarks/rule_cost.py --model mlp --batch 64    # configs/mnist_mlp.yaml's setting

Plain BP is the same network built from stock nn.Conv2d / nn.Linear (rule=None), trained
with the same SGD.  Steps of all rules are interleaved in one process, in a fresh random
order every round (a step's time depends on which ran before it), so machine noise hits
every rule alike, and the median step time is taken.  Everything a
rule does per step counts: forward, backward, the optimizer, and the rule's own hooks
(brSF's redraw, weight-mirror steps).  The process keeps freed memory for reuse, as
`localnet run` does (localnet/alloc.py; --malloc-default: glibc's defaults, where every
step page-faults its buffers back in).  The last line printed is a JSON object
{rule: time / BP time}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

from localnet.alloc import keep_freed_memory
from localnet.engine import InProcessExecutor, OptimConfig
from localnet.models import build_model
from localnet.rules import make_rule

RULES = ["bp", "fa", "dfa", "usf", "brsf", "frsf", "kp", "wm", "pfa", "pfa-o"]
# Each model at its own dataset's image size: an MLP fed CIFAR's 3072 inputs would
# overstate the rules whose feedback grows with the input width (PFA's R is r times W).
INPUT = {"mlp": (1, 28, 28)}
CIFAR = (3, 32, 32)


class PlainStep:
    """Stock PyTorch: forward, loss, backward, SGD."""

    def __init__(self, model, lr=0.1, momentum=0.9, wd=1e-4):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd,
                                   fused=True)

    def __call__(self, x, y):
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class RuleStep:
    def __init__(self, model):
        self.ex = InProcessExecutor(model, OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4))

    def __call__(self, x, y):
        self.ex.train_step(x, y, 0.1, 1e-4)


def make(rule: str, model: str, shape, fmt: str):
    r = None if rule == "plain" else make_rule("pfa", ortho=True) if rule == "pfa-o" else make_rule(rule)
    net = build_model(model, r, shape, 10)
    if fmt == "channels_last":  # as `localnet run` builds it (train.memory_format)
        net.to(memory_format=torch.channels_last)
    return PlainStep(net) if r is None else RuleStep(net)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rules", nargs="+", default=RULES)
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"],
                   default="channels_last", help="train.memory_format, for BP and every rule")
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's malloc thresholds alone (localnet/alloc.py)")
    args = p.parse_args()
    if not args.malloc_default:  # what `localnet run` and the actors do; plain BP gets it too
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = INPUT.get(args.model, CIFAR)
    x = torch.randn(args.batch, *shape)
    y = torch.randint(0, 10, (args.batch,))
    steps = {r: make(r, args.model, shape, args.memory_format) for r in ["plain", *args.rules]}
    times = {r: [] for r in steps}
    order = list(steps)
    shuffle = random.Random(0).shuffle
    for i in range(args.warmup + args.repeats):
        # a fresh order every round: a step's time depends on which ran just before it
        # (caches, the allocator), and a fixed order would bias some rules every time
        shuffle(order)
        for r in order:
            step = steps[r]
            tic = time.perf_counter()
            step(x, y)
            if i >= args.warmup:
                times[r].append(time.perf_counter() - tic)
    med = {r: statistics.median(t) for r, t in times.items()}
    base = med.pop("plain")
    size = "x".join(map(str, shape))
    print(f"{args.model}, batch {args.batch} of {size}, {args.threads} threads: plain BP step "
          f"{1000 * base:.1f} ms (median of {args.repeats})")
    for r, t in med.items():
        print(f"  {r:6s} {1000 * t:8.1f} ms   x{t / base:.3f}")
    print(json.dumps({r: round(t / base, 3) for r, t in med.items()}))


if __name__ == "__main__":
    main()
