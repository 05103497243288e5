"""Per-unit compute cost, measured in-process: time each unit's forward and backward on
one micro-batch.  Feeds `partition: {balance: cost}` and `localnet simulate`."""

from __future__ import annotations

import statistics
import time

import torch

from ..engine import Stage, loss_and_error
from ..builders import as_config, build_rule_and_model, optim_config


def measure_unit_costs(cfg, input_shape, num_classes: int, micro_batch: int | None = None,
                       repeats: int = 3, threads: int | None = None):
    """(fwd_s, bwd_s): median seconds per unit for one micro-batch (after one warm-up).

    Builds a throwaway copy of the model; the caller's model is not touched."""
    cfg = as_config(cfg)
    mb = micro_batch or max(cfg.train.batch_size // cfg.train.micro_batches, 1)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _, model = build_rule_and_model(cfg, input_shape, num_classes)
        units, names = list(model.units), model.unit_names
        stages = [Stage([u], optim_config(cfg), first=(i == 0), names=[names[i]])
                  for i, u in enumerate(units)]
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(mb, *input_shape, generator=g)
        y = torch.randint(0, num_classes, (mb,), generator=g)
        fwd = [[] for _ in units]
        bwd = [[] for _ in units]
        for r in range(repeats + 1):
            h, shapes = x, []
            for i, st in enumerate(stages):
                t0 = time.perf_counter()
                h = st.forward(h)
                if r:
                    fwd[i].append(time.perf_counter() - t0)
                shapes.append(h.shape)
            _, _, e = loss_and_error(h, y, mb)
            grad = e
            for i in reversed(range(len(stages))):
                if grad is None:  # DFA: nothing comes down; the stage's tap discards it
                    grad = torch.zeros(shapes[i])
                t0 = time.perf_counter()
                grad = stages[i].backward(grad, e=e)
                if r:
                    bwd[i].append(time.perf_counter() - t0)
            for st in stages:
                st.zero_grad()
        return [statistics.median(v) for v in fwd], [statistics.median(v) for v in bwd]
    finally:
        torch.set_num_threads(old_threads)


def stage_costs(unit_costs: list[float], boundaries: list[int]) -> list[float]:
    """Sum per-unit costs into per-stage costs."""
    cuts = [0] + list(boundaries) + [len(unit_costs)]
    return [sum(unit_costs[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
