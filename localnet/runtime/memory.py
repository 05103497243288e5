"""Memory preflight: will the actors fit?  Checked before any actor starts.

Each actor is a process: the process floor (Ray's worker, `import torch` and the runtime's
own; `runtime.actor_baseline_mb`, which `benchmarks/scaling.py` measures), plus its
weights, feedback weights, gradients and optimizer state, plus the activations autograd
keeps for the micro-batches the schedule holds in flight (`schedule.simulate`'s peak), and
for the forwards that wait for delayed errors (`channel.error.delay`), with the weights
each of those steps stashed.
Ray would otherwise start actors until the node runs out and kill them for memory at
setup -- a traceback instead of an answer, minutes in.
"""

from __future__ import annotations

import copy
import math

import torch

from ..config import ConfigError
from ..files import counted

# autograd keeps about this many activation-sized tensors per layer for the backward
# (input of the conv, BN's normalised input, ReLU's mask, ...): a conv + BN + ReLU unit
SAVED_PER_OUTPUT = 4
MB = 1 << 20


class MemoryPreflightError(ConfigError):
    """The placement does not fit the cluster's memory; says what to change."""


def _bytes(module: torch.nn.Module) -> tuple[int, int]:
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return params, buffers


def saved_bytes(mods: list[torch.nn.Module], in_shapes, micro_batch: int) -> int:
    """Bytes one stored forward of an actor's modules holds: its inputs and what autograd
    saves for the backward (parameters aside: the state counts them), measured by running
    one forward on zeros through copies of the modules (their BatchNorm statistics stay
    put).  A forward waiting steps for a delayed error holds exactly this, unlike the
    forwards inside a step, whose estimate (SAVED_PER_OUTPUT) also covers the backward's
    working memory."""
    from ..stage import _Chain

    chain = _Chain(*copy.deepcopy(mods)).train()
    params = {p.untyped_storage().data_ptr() for p in chain.parameters()}
    held: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            held[s.data_ptr()] = s.nbytes()
        return t

    xs = [torch.zeros(micro_batch, *s, requires_grad=True) for s in in_shapes]
    for x in xs:
        pack(x)
    # grad mode on: a caller under no_grad would otherwise see nothing saved
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chain(*xs)
    return sum(held.values())


def estimate(cfg, placement, model, input_shape, peak_in_flight: list[int]) -> list[dict]:
    """Per actor of `placement` (built from `model`): the estimate in bytes and its
    parts."""
    from ..models import unit_shapes
    from ..rules import RULES
    from .endpoint import error_delays_in, error_lags
    from .graph import modules_for

    rt, t = cfg.runtime, cfg.train
    shapes = unit_shapes(model, input_shape)
    mb = t.micro_batch_size
    base = int(rt.actor_baseline_mb * MB)
    dfa = RULES.get(cfg.rule.name).broadcast_output_error
    lags = error_lags(cfg.channel, placement, list(model.unit_names), dfa)
    links = error_delays_in(cfg.channel, placement, list(model.unit_names), dfa)
    out = []
    for i in range(placement.num_actors):
        mods, names, _, in_shapes, out_shape = modules_for(placement, i, model, shapes)
        p, b = map(sum, zip(*[_bytes(m) for m in mods])) if mods else (0, 0)
        # weights (and feedback weights), gradients, momentum; buffers; and one stashed
        # copy of the weights per step of forwards waiting for a delayed error
        state = (3 + lags[i]) * p + b
        act = 4 * mb * (math.prod(out_shape) + sum(math.prod(s) for s in in_shapes))
        inflight = SAVED_PER_OUTPUT * act * max(peak_in_flight[i], 1)
        if lags[i]:  # the forwards of `lags[i]` steps waiting for their errors, and the
            # errors queued on the delayed links into this actor (fp32 at most; DFA's are
            # the output error, a few numbers per sample)
            inflight += lags[i] * t.micro_batches * saved_bytes(mods, in_shapes, mb)
            if not dfa:
                inflight += (sum(links[i].values()) * t.micro_batches * 4 * mb
                             * math.prod(out_shape))
        out.append({"actor": i, "units": names, "baseline": base, "state": state,
                    "activations": inflight, "total": base + state + inflight,
                    "error_wait_steps": lags[i]})
    return out


def node_memory() -> tuple[int, int]:
    """(bytes Ray may give to workers over all alive nodes, number of nodes)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return int(sum(n.get("Resources", {}).get("memory", 0) for n in nodes)), len(nodes)


def summarize(per: list[dict]) -> dict:
    worst = max(per, key=lambda r: r["total"])
    out = {"actors": len(per), "total_mb": round(sum(r["total"] for r in per) / MB),
           "per_actor_mb_max": round(worst["total"] / MB),
           "baseline_mb": round(worst["baseline"] / MB)}
    wait = max(r.get("error_wait_steps", 0) for r in per)
    return {**out, "error_wait_steps": wait} if wait else out


def remedy(summary: dict, fewer: str) -> str:
    """What to change when the actors do not fit: fewer actors (`fewer` says how), more
    memory, and with delayed errors a shorter delay."""
    wait = summary.get("error_wait_steps")
    late = (f", a shorter channel.error.delay (forwards wait up to {wait} steps for "
            f"their errors, each step's micro-batches kept)" if wait else "")
    return f"Use fewer, larger actors ({fewer}){late}, or"


def check(cfg, placement, model, input_shape, peak_in_flight: list[int]) -> dict:
    """Raise MemoryPreflightError if the actors' estimate exceeds the nodes' memory;
    else return the estimate (summary.json's runtime.memory_estimate)."""
    per = estimate(cfg, placement, model, input_shape, peak_in_flight)
    total = sum(r["total"] for r in per)
    avail, n_nodes = node_memory()
    summary = {**summarize(per), "nodes": n_nodes, "nodes_memory_mb": round(avail / MB)}
    if avail and total > avail:
        pl = placement
        fewer = ("runtime.partition=per_unit, or '{stages: N}'" if pl.spec == "per_layer"
                 else "'{stages: N}' with fewer stages than now")
        raise MemoryPreflightError(
            f"runtime.partition={pl.spec!r} needs {counted(len(per), 'actor')}, estimated at "
            f"{summary['total_mb']} MB in all (each at least the process floor of "
            f"{summary['baseline_mb']} MB, runtime.actor_baseline_mb; the largest "
            f"{summary['per_actor_mb_max']} MB), but "
            f"{'the Ray node offers' if n_nodes == 1 else f'the {n_nodes} Ray nodes offer'} "
            f"{summary['nodes_memory_mb']} MB.  {remedy(summary, fewer)} add nodes.  "
            f"Nothing was started.")
    return summary
