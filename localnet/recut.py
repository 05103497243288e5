"""Resume a checkpoint under another cut of the model into stages.

A run's checkpoint holds one state per stage: the stage's part of the model (keys
"<module within the stage>.<rest>"), its optimizer's state (by position among the
stage's trainable parameters), its step count and, on the runtime's actors, the actor's
torch RNG.  Those states only fit stages cut where the run cut them.  Yet a run killed on
a cluster may have to go on where fewer (or more) actors fit, or in one process.

Every tensor of a stage belongs to one unit of the model, under the same path within
that unit whatever stage holds it -- a group of whole units, or one layer of a unit's
layer graph (per_layer) -- and the momentum of a parameter does not depend on which
stage holds it.  So re-cutting is bookkeeping: gather each unit's tensors and each
parameter's optimizer state from the old stages, then deal them out to the new ones.
Nothing is recomputed: the weights, feedback weights, layer RNGs and momenta are exactly
the checkpoint's, and training goes on as it would have (the maths of gpipe and 1f1b does
not depend on the cut: tests/test_runtime.py).

Refused, naming why: channels (each link's codec state and queue belongs to an edge of
the old cut) and forwards still waiting for a delayed error.

A stage is described by its member: ("units", a, b), units a..b-1 in order; or ("node",
name), one node of the layer graph (`UnitModel.layer_graph`), whose module holds its
unit's submodules under their paths within the unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

_WHY = "resume with the runtime.partition (and runtime.executor) that wrote it"
_CHANNELS = ("--resume: the checkpoint has communication channels (each link's state "
             "belongs to an edge of its cut); resume with the runtime.partition that wrote "
             "it: on Ray (a smaller cluster takes the same actors where their "
             "runtime.num_cpus fit; they share its cores), or in this one process with "
             "--set runtime.executor=local")
_CHANNELS_INPROCESS = ("--resume: the checkpoint has communication channels (each link's "
                       "state belongs to an edge of its cut); resume with "
                       "runtime.executor=inprocess and the runtime.partition that wrote it")


@dataclass
class _Part:
    """One module of a stage's chain: the stage's keys "<index>.<rest>" are unit
    `unit`'s keys "<rest>"; `keys` None: every key of the unit."""
    index: int
    unit: int
    keys: list[str] | None
    params: list[str]  # the trainable parameters' names, in the optimizer's order


def _parts(member: tuple, model, graph: dict) -> list[_Part]:
    def trainable(m):
        return [n for n, p in m.named_parameters() if p.requires_grad]

    if member[0] == "units":
        _, a, b = member
        return [_Part(u - a, u, None, trainable(model.units[u])) for u in range(a, b)]
    node = graph.get(member[1])
    if node is None:
        raise ConfigError(f"--resume: the checkpoint holds layer {member[1]!r}, which this "
                          f"model does not have: did a --set change the model?")
    return [_Part(0, node.unit, list(node.module.state_dict()), trainable(node.module))]


def _cuts_members(cuts: list[int]) -> list[tuple]:
    return [("units", a, b) for a, b in zip(cuts, cuts[1:])]


def _by_actors(saved: dict) -> bool:
    """Was `saved` written by actors (their files' record, or their gathered states with
    the placement), not by InProcessExecutor.state_dict?"""
    return "stages" not in saved or "placement" in saved


def saved_members(saved: dict, n_units: int, run_dir=None) -> list[tuple]:
    """The stage members of what an executor's `save_state` returned."""
    if not _by_actors(saved):  # InProcessExecutor.state_dict
        b = saved.get("boundaries")
        if b is None and len(saved["stages"]) == 1:  # written before cuts were recorded
            b = []
        if b is None:
            raise ConfigError(f"--resume: the checkpoint does not say where its "
                              f"{len(saved['stages'])} stages were cut; {_WHY}")
        return _cuts_members([0, *b, n_units])
    layout = saved
    if "placement" not in saved and "stages" not in saved:  # an old record: its manifest
        from .runtime.checkpoint import read_manifest

        layout = read_manifest(run_dir, saved)[1]
    if layout.get("placement"):
        from .runtime.graph import Placement

        return Placement.from_dict(layout["placement"]).stage_members()
    return _cuts_members([0, *layout["boundaries"], n_units])


def read_actor_states(run_dir, saved: dict) -> list[dict]:
    """The stage states the actors wrote to their own files, read here, in order."""
    from .files import load_state
    from .runtime.checkpoint import read_manifest

    gen, manifest = read_manifest(run_dir, saved)
    return [load_state(Path(gen) / r["file"], f"{r['actor']}'s checkpoint")
            for r in manifest["actors"]]


def recut(states: list[dict], old: list[tuple], new: list[tuple], model) -> list[dict]:
    """The stage states `states`, held by stages `old` (members), dealt out to stages
    `new`.  model: the run's model (its structure only)."""
    for st in states:
        if "channels" in st or st.get("pending") or st.get("inflight"):
            raise ConfigError(_CHANNELS)
    counts = {int(st["steps"]) for st in states}
    if len(counts) != 1:
        raise ConfigError(f"--resume: the checkpoint's stages stepped {sorted(counts)} "
                          f"times; only stages in step can be re-cut")
    steps = counts.pop()
    n = len(model.units)
    if any(m[0] == "units" and not 0 <= m[1] < m[2] <= n for m in old):
        raise ConfigError(f"--resume: the checkpoint's stages hold units "
                          f"{[list(m[1:]) for m in old]}, which do not fit this model's {n} "
                          f"units: did a --set change the model?")
    graph = ({nd.name: nd for nd in model.layer_graph()}
             if any(m[0] == "node" for m in (*old, *new)) else {})
    tensors: dict[tuple[int, str], object] = {}  # (unit, key within it) -> value, in order
    moments: dict[tuple[int, str], dict] = {}    # (unit, parameter) -> optimizer state
    group, rng_of = None, {}
    for st, member in zip(states, old):
        parts = {p.index: p for p in _parts(member, model, graph)}
        for k, v in st["module"].items():
            i, _, rest = k.partition(".")
            tensors[(parts[int(i)].unit, rest)] = v
        names = [(p.unit, name) for p in parts.values() for name in p.params]
        opt = st.get("opt")
        if opt:
            held = opt["param_groups"][0]["params"]
            if len(held) != len(names):
                raise ConfigError(f"--resume: the checkpoint's stage {_show(member)} "
                                  f"optimizes {len(held)} parameters, where this model's "
                                  f"have {len(names)}: did a --set change the model or rule?")
            group = opt["param_groups"][0]
            for idx, s in opt["state"].items():
                moments[names[held.index(int(idx))]] = s
        for p in parts.values():
            rng_of.setdefault(p.unit, st.get("rng"))
    out, dealt = [], set()
    for member in new:
        parts = _parts(member, model, graph)
        module = {}
        for p in parts:
            keys = p.keys if p.keys is not None else [r for u, r in tensors if u == p.unit]
            for rest in keys:
                module[f"{p.index}.{rest}"] = tensors[(p.unit, rest)]
                dealt.add((p.unit, rest))
        names = [(p.unit, name) for p in parts for name in p.params]
        st = {"module": module, "opt": None, "steps": steps}
        if names and group is not None:
            st["opt"] = {"state": {i: moments[nm] for i, nm in enumerate(names)
                                   if nm in moments},
                         "param_groups": [{**group, "params": list(range(len(names)))}]}
        if rng_of.get(parts[0].unit) is not None:  # an actor's own stream: its unit's old one
            st["rng"] = rng_of[parts[0].unit]
        # an actor checks that it holds what the state says (a stage ignores it)
        st.update({"units": list(member[1:])} if member[0] == "units" else {"node": member[1]})
        out.append(st)
    left = [f"units.{u}.{r}" for u, r in tensors if (u, r) not in dealt]
    if left:
        raise ConfigError(f"--resume: re-cut, no stage would hold {left[:3]}; " + _WHY)
    return out


def _show(member: tuple) -> str:
    return f"of units [{member[1]}, {member[2]})" if member[0] == "units" else repr(member[1])


def fit(saved: dict, run_dir, members: list[tuple], model, actors: bool) -> dict | None:
    """`saved` (what an executor's save_state returned) as gathered stage states for
    the stages `members` -- {"stages": [...], "recut": [old members]} -- or None when
    those stages wrote it, on the same kind of executor (which loads it as it is).
    actors: whether the resuming executor runs actors (their states add an RNG and
    their links' own channel states)."""
    old = saved_members(saved, len(model.units), run_dir)
    if old == list(members) and _by_actors(saved) == actors:
        return None
    if "channels" in saved:  # the in-process executor keeps its links' state apart
        raise ConfigError(_CHANNELS_INPROCESS)
    states = saved["stages"] if "stages" in saved else read_actor_states(run_dir, saved)
    return {"stages": recut(states, old, list(members), model), "recut": old}


def describe(members: list[tuple]) -> str:
    """"11 stages of units, cut at [1, 2, ...]", for a note and the summary."""
    if any(m[0] == "node" for m in members):
        return f"{len(members)} actors of one layer each (per_layer)"
    if len(members) == 1:
        return "1 stage of every unit"
    return f"{len(members)} stages of units, cut at {[m[1] for m in members[1:]]}"
