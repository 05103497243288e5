"""`localnet simulate`: predict a config's pipeline without Ray.

Per-actor costs are measured in-process (each actor's forward, backward and update on
one micro-batch) unless given; the schedule is then dry-run by `localnet.schedules.simulate`, which
raises `DeadlockError` naming the stuck actions if it cannot finish.  Every schedule
(gpipe, 1f1b, async) is checked for the config's actor graph, not only the chosen one.
async streams across batches, so it is simulated over `batches` batches (default 8)
and reported per batch.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..builders import as_config, build_rule_and_model
from ..config import ConfigError
from ..files import counted
from . import memory
from .cost import measure_costs
from .partition import resolve_placement
from ..schedules import (SCHEDULES, DeadlockError, make_schedule, simulate, staleness,
                         stream_staleness)


class ScheduleDeadlock(DeadlockError, ConfigError):
    """A DeadlockError that `localnet simulate` reports like a bad config (exit code 2,
    the stuck actions named)."""

    def __init__(self, name: str, err: DeadlockError):
        self.schedule = name
        DeadlockError.__init__(self, err.stuck)
        self.args = (f"runtime.schedule={name}: {err}",)

    def __str__(self):
        return self.args[0]

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


def check_partition(cfg, memory_too: bool = False):
    """How many actors cfg's `runtime.partition` makes of its model, for `localnet
    validate`: a partition that the model cannot take (more stages than units, a unit
    name it lacks) is a ConfigError before any data loads or actor starts.  None for a
    dataset whose shape only its data tells.  `{balance: cost}` is cut by parameters
    here: the number of stages, not where they fall, is what can be wrong.
    memory_too: (actors, the memory preflight's estimate of them, `memory.summarize`)."""
    cfg = as_config(cfg)
    if cfg.data.name not in KNOWN_SHAPES:
        return (None, None) if memory_too else None
    shape, _ = KNOWN_SHAPES[cfg.data.name]
    _, model = build_rule_and_model(cfg, *KNOWN_SHAPES[cfg.data.name])

    def by_params():
        return [sum(p.numel() for p in u.parameters()) for u in model.units]

    pl = resolve_placement(cfg.runtime.partition, model, by_params)
    if cfg.runtime.executor != "inprocess":  # (in one process the run checks its own cut)
        from .endpoint import check_channel_graph

        check_channel_graph(cfg.channel, pl, list(model.unit_names))  # channel.edges keys
    if not memory_too:
        return pl.num_actors
    sched = make_schedule(cfg.runtime.schedule.name, pl.num_actors, cfg.train.micro_batches,
                          None if pl.is_chain else pl.inputs, **cfg.runtime.schedule.options())
    from ..rules import RULES

    dfa = RULES.get(cfg.rule.name).broadcast_output_error
    peak = simulate(sched, 1.0, 1.0, dfa=dfa).peak_activations
    return pl.num_actors, memory.summarize(memory.estimate(cfg, pl, model, shape, peak))


def simulate_config(cfg, input_shape=None, num_classes=None, fwd=None, bwd=None,
                    comm: float = 0.0, repeats: int = 3, step=None,
                    batches: int | None = None, cores: int | None = None,
                    hop_cost: float = 0.0, call_cost: float = 0.0,
                    hop_cost_per_mib: float = 0.0, costs: dict | None = None) -> dict:
    """Plan for cfg.runtime: actors, per-actor costs (s per micro-batch), and the
    simulated makespan, bubble fraction and samples/s of one batch (async: the mean
    over `batches` streamed batches).  cores: actors share that many cores (None: one
    each).  hop_cost + hop_cost_per_mib x the payload's MiB: seconds of CPU the data
    plane spends on one message between actors (`benchmarks/dataplane.py` measures both
    per payload size: a frame's fixed cost, then the bytes'), charged to the receiving
    action; a payload is the sending actor's output at the micro-batch size (an error
    has the shape of the activation it answers).  call_cost: the coordinator's one call
    per actor, charged once per actor per batch -- or half of it per batch where each
    call carries two (a flushing schedule's `runtime.batches_per_call`: the steady state
    of a training loop that looks one batch ahead).
    costs: a finished Ray run's own account (`run_costs`), for what it does not give:
    the machine's cores, a message's CPU (hop_cost), and the measured unit costs scaled
    to what that run's actors spent on the same work."""
    for name, v in (("comm", comm), ("hop_cost", hop_cost), ("call_cost", call_cost),
                    ("hop_cost_per_mib", hop_cost_per_mib)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    cfg = as_config(cfg)
    shape, nc = data_shape(cfg, input_shape, num_classes)
    rt, t = cfg.runtime, cfg.train
    _, model = build_rule_and_model(cfg, shape, nc)
    mb = t.micro_batch_size
    measured = {}

    def unit_costs():  # for partition: {balance: cost}
        f, b, _ = measure_costs(cfg, shape, nc, None, mb, repeats, rt.threads)
        return [a + b_ for a, b_ in zip(f, b)]

    pl = resolve_placement(rt.partition, model, unit_costs)
    S, M = pl.num_actors, t.micro_batches
    name, opts = rt.schedule.name, rt.schedule.options()
    is_async = SCHEDULES.get(name).streamed
    ahead = batches_ahead(rt.schedule)
    if fwd is None or bwd is None:
        measured["f"], measured["b"], measured["s"] = measure_costs(
            cfg, shape, nc, pl, mb, repeats, rt.threads, stash=is_async)
        fwd = fwd or measured["f"]
        bwd = bwd or measured["b"]
        step = measured["s"] if step is None else step
        source = "measured"
    else:
        source = "given"
    step = 0.0 if step is None else step
    scale = None
    if costs is not None:
        cores = costs["cores"] if cores is None else cores
        if not (hop_cost or hop_cost_per_mib or call_cost):
            hop_cost = costs["hop_cost_s"]  # call_cost is in it: the coordinator's CPU too
        if source == "measured":
            run = costs["config"]  # the run's own cut measured once, not twice
            mine, its = (_work(c) for c in (cfg, run))
            if mine != its:  # its compute per batch, over another model's measured now
                raise ConfigError(
                    f"--costs-from {costs['run']}: a run of {its}, and this config is "
                    f"{mine}: its actors' compute says nothing of this model's.  Give a run "
                    f"of this model and data, or this config's costs (--fwd and --bwd)")
            same = ((run.model, run.rule, costs["partition"], costs["schedule"],
                     costs["micro_batch"]) == (cfg.model, cfg.rule, pl.spec, name, mb))
            now = (batch_compute(fwd, bwd, step, M, is_async) if same
                   else _measured_batch(run, shape, nc, repeats))
            scale = compute_scale(costs["compute_s"] / now if now > 0 else 1.0,
                                  costs["actors"], S, costs["cores"], cores)
            fwd, bwd = [f * scale for f in fwd], [b_ * scale for b_ in bwd]
            step = ([v * scale for v in step] if isinstance(step, (list, tuple))
                    else step * scale)
    if len(fwd) != S or len(bwd) != S:
        raise ConfigError(f"--fwd / --bwd: runtime.partition makes {counted(S, 'actor')}, so "
                          f"give {S} costs each (got {len(fwd)} forward, {len(bwd)} backward)")
    from ..rules import RULES
    dfa = RULES.get(cfg.rule.name).broadcast_output_error
    graph = None if pl.is_chain else pl.inputs
    checked = {}
    for other in SCHEDULES:  # a schedule that cannot finish raises, naming the stuck actions
        for k in (1, 2):
            try:
                simulate(make_schedule(other, S, M * k, graph), 1.0, 1.0, dfa=dfa)
            except DeadlockError as err:
                raise ScheduleDeadlock(other, err) from None
        checked[other] = "ok"
    K = (batches or 8) if is_async else 1
    per_call = 1 if is_async else rt.batches_per_call  # training batches in one call
    sched = make_schedule(name, S, M * K, graph, **opts)
    payload = payload_bytes(pl, model, shape, mb)

    def hop(src, dst, op):  # an activation (or DFA's e) carries src's output, an error dst's
        return hop_cost + hop_cost_per_mib * payload[src if op == "F" else dst] / 2**20

    # async steps after every micro-batch; gpipe / 1f1b once per batch
    sim = simulate(sched, fwd, bwd, comm, step_cost=step, hop_cost=hop,
                   call_cost=float(call_cost) / per_call, dfa=dfa, batch_size=t.batch_size * K,
                   cores=cores, feed=M if is_async else None, ahead=ahead)
    stale = stream_staleness(graph, S) if is_async else staleness(sched)
    one = simulate(make_schedule(name, S, M, graph, **opts), 1.0, 1.0, dfa=dfa)
    mem = memory.summarize(memory.estimate(cfg, pl, model, shape, one.peak_activations))
    names = [" ".join(n) for n in pl.names]
    return {
        "schedule": sched.name, "stages": S, "actors": S, "micro_batches": M,
        "batch_size": t.batch_size, "batches": K, "partition": pl.spec,
        "edges": [list(e) for e in pl.edges()],
        "dfa_broadcast": dfa, "cost_source": source, "comm_s": comm, "cores": cores,
        "hop_cost_s": float(hop_cost), "hop_cost_per_mib_s": float(hop_cost_per_mib),
        "call_cost_s": float(call_cost), "payload_bytes": payload,
        # the coordinator's: one per actor per call (interpreter.py)
        "calls_per_batch": S / per_call, "batches_per_call": per_call,
        "batches_ahead": ahead,
        "deadlock_free": checked, "staleness": max(stale), "staleness_per_actor": stale,
        "per_stage": [{"stage": i, "units": list(pl.names[i]), "fwd_s": f, "bwd_s": b_,
                       "step_s": (step[i] if isinstance(step, (list, tuple)) else step),
                       "busy_s": busy / K, "peak_activations": pk}
                      for i, (f, b_, busy, pk) in enumerate(
                          zip(fwd, bwd, sim.busy, sim.peak_activations))],
        "names": names,
        "makespan_s": sim.makespan / K, "bubble_fraction": sim.bubble_fraction,
        # every action as simulated, over all K batches: [actor, op, micro-batch (-1: a
        # batch's STEP), start s, end s], in start order (`localnet simulate --plot`)
        "timeline": [[st, a.op, a.mb, t0, t1] for st, a, t0, t1 in sim.trace],
        "samples_per_s": sim.samples_per_s,
        "gpipe_equal_cost_bubble": (S - 1) / (M + S - 1),
        "balance_hint": balance_hint(rt.partition, [f + b_ for f, b_ in zip(fwd, bwd)]),
        "memory_estimate": mem,
        "costs_from": None if costs is None else {
            "run": costs["run"], "hop_cost_s": float(hop_cost), "compute_scale": scale,
            "messages_per_batch": costs["messages"], "samples_per_s": costs["samples_per_s"],
            "same_plan": (costs["partition"], costs["schedule"], costs["micro_batches"])
            == (pl.spec, sched.name, M)},
    }


def compute_scale(run_scale: float, run_actors: int, actors: int, run_cores, cores) -> float:
    """How much slower than the units timed alone the actors compute, for `actors` on
    `cores`, from a run where `run_actors` on `run_cores` computed `run_scale` times
    slower.  Each actor that shares a core finds the caches cold at each of its actions
    (others ran in between), so the loss grows with actors per core: 1 + a (actors /
    cores - 1), with a fitted to the run.  On 2 Xeon cores ResNet-20's actors spent
    1.05x, 1.21x and 1.35x the CPU of its 2-actor cut on a batch's compute with 4, 11 and
    20 actors (RESULTS.md, "Notes: the simulator calibrated on a run").  A run with a
    core per actor (or on a machine faster than now) says nothing of crowding: its
    scale then holds as it is."""
    def crowd(n, c):
        return max(n / c - 1.0, 0.0) if c else 0.0

    if run_scale <= 1.0 or not crowd(run_actors, run_cores):
        return run_scale
    return 1.0 + (run_scale - 1.0) / crowd(run_actors, run_cores) * crowd(actors, cores)


def batch_compute(fwd, bwd, step, M: int, per_micro_batch_step: bool) -> float:
    """One batch's compute over all actors: M forwards and backwards each, and the
    updates (one per batch; async: one per micro-batch)."""
    steps = sum(step) if isinstance(step, (list, tuple)) else step * len(fwd)
    return M * (sum(fwd) + sum(bwd)) + steps * (M if per_micro_batch_step else 1)


def _measured_batch(cfg, shape, nc, repeats: int) -> float:
    """`batch_compute` of cfg's own actors, their costs measured now."""
    _, model = build_rule_and_model(cfg, shape, nc)
    t, rt = cfg.train, cfg.runtime
    streamed = SCHEDULES.get(rt.schedule.name).streamed

    def unit_costs():
        f, b, _ = measure_costs(cfg, shape, nc, None, t.micro_batch_size, repeats, rt.threads)
        return [a + b_ for a, b_ in zip(f, b)]

    pl = resolve_placement(rt.partition, model, unit_costs)
    f, b, s = measure_costs(cfg, shape, nc, pl, t.micro_batch_size, repeats, rt.threads,
                            stash=streamed)
    return batch_compute(f, b, s, t.micro_batches, streamed)


def _work(cfg) -> str:
    """What sets a config's compute per sample: its model (and an MLP's widths) and its
    data's shape."""
    m = cfg.model
    return (f"{m.name}{m.widths if m.name == 'mlp' else ''} on {cfg.data.name}"
            .replace(", ", "-"))


def run_costs(run_dir) -> dict:
    """What a finished Ray run tells `simulate_config` about the machine it ran on, from
    its own CPU account (summary.json): its actors' compute per batch, and everything
    else the machine's cores did during its training -- data plane, interpreter and
    checks, Ray's calls, the coordinator, the kernel's copies -- spread evenly over its
    messages between actors.  That is what one message cost there all told, about
    twice what `benchmarks/dataplane.py` measures for the plane alone, and what
    `benchmarks/scaling.py` predicts each run from ("on the run's own profile",
    RESULTS.md).  The compute includes the actors' evaluation forwards, a few percent
    on a run that evaluates once."""
    from ..config import load_run_config
    from ..timing import busy_s

    where = f"--costs-from {run_dir}"
    try:
        s = json.loads((Path(run_dir) / "summary.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no summary.json there; give the directory of a "
                          f"finished `localnet run`") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: summary.json is unreadable ({err})") from None
    rt = s.get("runtime") or {}
    if rt.get("executor") != "ray":
        raise ConfigError(f"{where}: a run with runtime.executor="
                          f"{rt.get('executor') or 'inprocess'}; only Ray actors account for "
                          f"what their messages cost")
    if not (Path(run_dir) / "config.yaml").is_file():
        raise ConfigError(f"{where}: no config.yaml beside its summary.json; give the "
                          f"directory of a finished `localnet run`")
    cfg, _ = load_run_config(run_dir)
    # the batches its last process trained, which its CPU account covers: a resumed
    # run's `steps`, `samples_per_s` and `train_s` count the earlier processes' too
    here = s.get("trained_here")
    steps = here["steps"] if isinstance(here, dict) else int(s.get("steps") or 0)
    compute = (rt.get("actor_cpu_s") or {}).get("compute") or 0.0
    busy = busy_s(s.get("machine_cpu_s"))
    edges = rt.get("edges") or []
    if steps <= 0 or compute <= 0 or busy <= 0 or not edges:
        raise ConfigError(f"{where}: its summary.json has no CPU account to calibrate on "
                          f"(steps, machine_cpu_s, runtime.actor_cpu_s, runtime.edges: "
                          f"a Linux run of a model cut into several actors)")
    M = int(rt["micro_batches"])
    # each micro-batch: an activation up every edge, and an error back down it -- or
    # DFA's e from the last actor to every other one
    errors = int(rt["actors"]) - 1 if rt.get("dfa_broadcast") else len(edges)
    messages = M * (len(edges) + errors)
    crowding = rt.get("crowding") or [None, None]
    return {"run": str(run_dir), "config": cfg, "steps": steps,
            "compute_s": compute / steps, "busy_s": busy / steps, "messages": messages,
            "hop_cost_s": max(busy - compute, 0.0) / steps / messages,
            "cores": crowding[1], "actors": int(rt["actors"]),
            "samples_per_s": s.get("samples_per_s"),
            "partition": rt.get("partition"), "schedule": rt.get("schedule"),
            "micro_batches": M, "micro_batch": cfg.train.micro_batch_size}


def batches_ahead(schedule) -> int:
    """How many batches the coordinator issues before the loss it waits for: async's
    `ahead` (runtime.schedule, a ScheduleConfig); 0 for a schedule that flushes."""
    cls = SCHEDULES.get(schedule.name)
    return getattr(cls(**schedule.options()).options, "ahead", 0) if cls.streamed else 0


def balance_hint(partition, work: list[float], limit: float = 1.25) -> str | None:
    """A line for a user whose `{stages: N}` cut by parameters leaves the stages' work
    uneven: parameters stand in for compute only roughly (a ResNet's last blocks hold
    16x the first blocks' weights on 1/16 of the pixels), and the busiest stage paces
    the pipeline.  None when the cut is even enough, or not balanced by parameters."""
    if getattr(partition, "balance", None) != "params" or len(work) < 2 or sum(work) <= 0:
        return None
    ratio = max(work) / (sum(work) / len(work))
    if ratio <= limit:
        return None
    return (f"the busiest stage does {ratio:.2f}x the mean stage's work: runtime.partition "
            f"{{stages: {len(work)}, balance: cost}} cuts the units by measured time instead")


def payload_bytes(pl, model, input_shape, micro_batch: int) -> list[int]:
    """Bytes of each actor's output at the micro-batch size: what it sends up each edge,
    and what comes back down as the error on it (in the weights' dtype, as the actors
    send them)."""
    import math

    from ..models import unit_shapes
    from .graph import modules_for

    shapes = unit_shapes(model, input_shape)
    size = next(model.parameters()).element_size()
    return [micro_batch * size * math.prod(modules_for(pl, i, model, shapes)[4])
            for i in range(pl.num_actors)]
