"""Per-actor compute cost, measured in-process: time each actor's forward, backward and
update on one micro-batch.  Feeds `partition: {balance: cost}` and `localnet simulate`."""

from __future__ import annotations

import statistics
import time

import torch

from ..engine import loss_and_error
from ..builders import as_config, build_rule_and_model, optim_config


def measure_costs(cfg, input_shape, num_classes: int, placement=None,
                  micro_batch: int | None = None, repeats: int = 3, threads: int | None = None,
                  stash: bool = False):
    """(fwd_s, bwd_s, step_s): median seconds per actor of `placement` (default: one
    actor per unit) for one micro-batch, after one warm-up.  stash: time the async
    schedule's weight stashing too.  Builds a throwaway copy of the model."""
    from ..models import unit_shapes
    from ..stage import NodeStage
    from .graph import Placement, modules_for

    cfg = as_config(cfg)
    mb = micro_batch or cfg.train.micro_batch_size
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _, model = build_rule_and_model(cfg, input_shape, num_classes)
        pl = placement or Placement.from_boundaries(list(range(1, len(model.units))),
                                                    list(model.unit_names))
        S = pl.num_actors
        stages = []
        shapes = unit_shapes(model, input_shape)
        for i in range(S):
            mods, names, _, _, _ = modules_for(pl, i, model, shapes)
            stages.append(NodeStage(mods, optim_config(cfg), names, stash=stash,
                                    grad_inputs=[p >= 0 for p in pl.inputs[i]]))
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(mb, *input_shape, generator=g)
        y = torch.randint(0, num_classes, (mb,), generator=g)
        fwd, bwd, upd = ([[] for _ in range(S)] for _ in range(3))
        clock = time.perf_counter
        for r in range(repeats + 1):
            outs = []
            for i, st in enumerate(stages):
                ins = [x if p < 0 else outs[p] for p in pl.inputs[i]]
                t0 = clock()
                outs.append(st.forward(ins[0], 0, ins[1:]))
                if r:
                    fwd[i].append(clock() - t0)
            _, _, e = loss_and_error(outs[-1], y, mb)
            grads: list = [None] * S
            grads[-1] = e
            for i in reversed(range(S)):
                grad = grads[i] if grads[i] is not None else torch.zeros(outs[i].shape)
                t0 = clock()
                dxs = stages[i].backward(grad, 0, e=e)
                if r:
                    bwd[i].append(clock() - t0)
                for slot, p in enumerate(pl.inputs[i]):
                    if p >= 0 and dxs[slot] is not None:
                        grads[p] = dxs[slot] if grads[p] is None else grads[p] + dxs[slot]
            for i, st in enumerate(stages):
                t0 = clock()
                st.step(1e-9, 0.0)
                if r:
                    upd[i].append(clock() - t0)
        med = lambda v: [statistics.median(t) for t in v]  # noqa: E731
        return med(fwd), med(bwd), med(upd)
    finally:
        torch.set_num_threads(old_threads)


def measure_unit_costs(cfg, input_shape, num_classes: int, micro_batch: int | None = None,
                       repeats: int = 3, threads: int | None = None):
    """(fwd_s, bwd_s): median seconds per unit for one micro-batch (after one warm-up)."""
    f, b, _ = measure_costs(cfg, input_shape, num_classes, None, micro_batch, repeats, threads)
    return f, b


def unit_costs(cfg, input_shape, num_classes: int):
    """`resolve_placement`'s cost function for a config: each unit's forward + backward
    seconds, measured only if it is called (a partition that balances by cost)."""
    def costs() -> list[float]:
        f, b = measure_unit_costs(cfg, input_shape, num_classes, threads=cfg.runtime.threads)
        return [x + y for x, y in zip(f, b)]
    return costs
