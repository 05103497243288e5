"""`localnet simulate`: predict a config's pipeline without Ray.

Per-stage costs are measured in-process (each unit's forward and backward on one
micro-batch, summed per stage) unless given; the schedule is then dry-run by
`schedule.simulate`.
"""

from __future__ import annotations

from ..builders import as_config, build_rule_and_model
from .cost import measure_unit_costs, stage_costs
from .partition import groups, resolve_partition
from .schedule import make_schedule, simulate

# fixed by the dataset itself, so `simulate` need not load data for them
KNOWN_SHAPES = {"mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10),
                "cifar10": ((3, 32, 32), 10)}


def data_shape(cfg, input_shape=None, num_classes=None):
    """(input_shape, num_classes): given, else known for the dataset, else from load_data."""
    if input_shape and num_classes:
        return tuple(input_shape), int(num_classes)
    if cfg.data.name in KNOWN_SHAPES:
        shape, nc = KNOWN_SHAPES[cfg.data.name]
    else:
        from ..data import load_data
        d = cfg.data
        data = load_data(d.name, root=d.root, subset=d.subset, test_subset=d.test_subset,
                         augment=d.augment, download=d.download, seed=cfg.seed,
                         image_size=d.image_size)
        shape, nc = data.input_shape, data.num_classes
    return tuple(input_shape or shape), int(num_classes or nc)


def simulate_config(cfg, input_shape=None, num_classes=None, fwd=None, bwd=None,
                    comm: float = 0.0, repeats: int = 3) -> dict:
    """Plan for cfg.runtime: stages, per-stage costs (s per micro-batch), and the
    simulated makespan, bubble fraction and samples/s of one batch."""
    cfg = as_config(cfg)
    shape, nc = data_shape(cfg, input_shape, num_classes)
    rt, t = cfg.runtime, cfg.train
    _, model = build_rule_and_model(cfg, shape, nc)
    units = list(model.units)
    params = [sum(p.numel() for p in u.parameters()) for u in units]
    measured = {}

    def unit_costs():
        if not measured:
            measured["f"], measured["b"] = measure_unit_costs(
                cfg, shape, nc, max(t.batch_size // t.micro_batches, 1), repeats, rt.threads)
        return [a + b for a, b in zip(measured["f"], measured["b"])]

    bounds = resolve_partition(rt.partition, len(units), params, unit_costs)
    S, M = len(bounds) + 1, t.micro_batches
    if fwd is None or bwd is None:
        unit_costs()
        fwd = fwd or stage_costs(measured["f"], bounds)
        bwd = bwd or stage_costs(measured["b"], bounds)
        source = "measured"
    else:
        source = "given"
    if len(fwd) != S or len(bwd) != S:
        raise ValueError(f"{S} stages but {len(fwd)} forward / {len(bwd)} backward costs")
    from ..rules import make_rule
    dfa = not make_rule(cfg.rule.name, **cfg.rule.options()).sends_error
    sched = make_schedule(rt.schedule, S, M)
    sim = simulate(sched, fwd, bwd, comm, dfa=dfa, batch_size=t.batch_size)
    names = model.unit_names
    return {
        "schedule": sched.name, "stages": S, "micro_batches": M, "batch_size": t.batch_size,
        "dfa_broadcast": dfa, "cost_source": source, "comm_s": comm,
        "per_stage": [{"stage": i, "units": names[a:b], "fwd_s": f, "bwd_s": b_,
                       "busy_s": busy, "peak_activations": pk}
                      for i, ((a, b), f, b_, busy, pk) in enumerate(
                          zip(groups(bounds, len(units)), fwd, bwd, sim.busy, sim.peak_activations))],
        "makespan_s": sim.makespan, "bubble_fraction": sim.bubble_fraction,
        "samples_per_s": sim.samples_per_s,
        "gpipe_equal_cost_bubble": (S - 1) / (M + S - 1),
    }
