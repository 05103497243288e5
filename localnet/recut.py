"""Resume a checkpoint under another cut of the model into stages.

A run's checkpoint holds one state per stage: the stage's slice of the model (keys
"<unit within the stage>.<rest>"), its optimizer's state (by position among the stage's
trainable parameters), its step count and, on the runtime's actors, the actor's torch
RNG.  Those states only fit stages cut where the run cut them.  Yet a run killed on a
cluster may have to go on where fewer (or more) actors fit, or in one process.

Every stage of a chain of units holds whole units, and the momentum of a parameter does
not depend on which stage holds it, so re-cutting is bookkeeping: gather each unit's
tensors and each parameter's optimizer state from the old stages, then deal them out to
the new ones.  Nothing is recomputed, so the weights, feedback weights, layer RNGs and
momenta are exactly the checkpoint's, and training goes on as it would have (the maths
of 1f1b and gpipe does not depend on the cut: tests/test_runtime.py).

What cannot be re-cut is refused, naming why: a per-layer graph (its actors hold parts
of units), communication channels (each link's codec state and queue belongs to an edge
of the old cut) and forwards still waiting for a delayed error.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

_WHY = "resume with the runtime.partition (and runtime.executor) that wrote it"


def unit_params(units) -> list[list[str]]:
    """Each unit's trainable parameters' names, in the order a stage's optimizer holds
    them (`Stage`: `module.parameters()`, unit after unit)."""
    return [[n for n, p in u.named_parameters() if p.requires_grad] for u in units]


def _layout(saved: dict, run_dir) -> dict:
    """The actors' layout (placement, boundaries) that `saved` was written in."""
    if "placement" in saved or "stages" in saved:
        return saved
    from .runtime.checkpoint import read_manifest  # a record without it: the manifest's

    return read_manifest(run_dir, saved)[1]


def saved_cuts(saved: dict, n_units: int, run_dir=None) -> list[int]:
    """The cuts [0, b1, ..., n_units] of what an executor's `save_state` returned."""
    if "stages" in saved and "placement" not in saved:  # InProcessExecutor.state_dict
        b = saved.get("boundaries")
        if b is None and len(saved["stages"]) == 1:  # written before cuts were recorded
            b = []
        if b is None:
            raise ConfigError(f"--resume: the checkpoint does not say where its "
                              f"{len(saved['stages'])} stages were cut; {_WHY}")
        return [0, *b, n_units]
    layout = _layout(saved, run_dir)
    if (layout.get("placement") or {"kind": "units"})["kind"] != "units" \
            or layout.get("boundaries") is None:
        raise ConfigError(f"--resume: the checkpoint's actors each hold one layer "
                          f"(runtime.partition: per_layer); a layer graph cannot be "
                          f"re-cut into other stages: {_WHY}")
    return [0, *layout["boundaries"], n_units]


def read_actor_states(run_dir, saved: dict) -> list[dict]:
    """The stage states the actors wrote to their own files, read here, in order."""
    from .files import load_state
    from .runtime.checkpoint import read_manifest

    gen, manifest = read_manifest(run_dir, saved)
    return [load_state(Path(gen) / r["file"], f"{r['actor']}'s checkpoint")
            for r in manifest["actors"]]


def recut(states: list[dict], old: list[int], new: list[int],
          params: list[list[str]]) -> list[dict]:
    """The stage states `states`, cut at `old` ([0, ..., n_units]), dealt out to stages
    cut at `new`.  params: `unit_params(model.units)`."""
    if any(b <= a for a, b in zip(old, old[1:])) or old[-1] != new[-1]:
        raise ConfigError(f"--resume: the checkpoint's stages are cut at {old[1:-1]}, "
                          f"which does not fit this model's {new[-1]} units: did a --set "
                          f"change the model?")
    for st in states:
        if "channels" in st or st.get("pending") or st.get("inflight"):
            raise ConfigError("--resume: the checkpoint has communication channels (each "
                              "link's state belongs to an edge of its cut); " + _WHY)
    counts = {int(st["steps"]) for st in states}
    if len(counts) != 1:
        raise ConfigError(f"--resume: the checkpoint's stages stepped {sorted(counts)} "
                          f"times; only stages in step can be re-cut")
    steps = counts.pop()
    tensors: dict[tuple[int, str], object] = {}  # (unit, key within it) -> value, in order
    moments: dict[tuple[int, str], dict] = {}    # (unit, parameter) -> optimizer state
    group, rng_of = None, {}
    for st, a, b in zip(states, old[:-1], old[1:]):
        for k, v in st["module"].items():
            i, _, rest = k.partition(".")
            tensors[(a + int(i), rest)] = v
        names = [(u, n) for u in range(a, b) for n in params[u]]
        opt = st.get("opt")
        if opt:
            held = opt["param_groups"][0]["params"]
            if len(held) != len(names):
                raise ConfigError(f"--resume: the checkpoint's stage of units [{a}, {b}) "
                                  f"optimizes {len(held)} parameters, where this model's "
                                  f"have {len(names)}: did a --set change the model or rule?")
            group = opt["param_groups"][0]
            for idx, s in opt["state"].items():
                moments[names[held.index(int(idx))]] = s
        for u in range(a, b):
            rng_of[u] = st.get("rng")
    out = []
    for a, b in zip(new[:-1], new[1:]):
        names = [(u, n) for u in range(a, b) for n in params[u]]
        st = {"module": {f"{u - a}.{rest}": v for (u, rest), v in tensors.items()
                         if a <= u < b},
              "opt": None, "steps": steps}
        if names and group is not None:
            st["opt"] = {"state": {i: moments[nm] for i, nm in enumerate(names)
                                   if nm in moments},
                         "param_groups": [{**group, "params": list(range(len(names)))}]}
        if rng_of.get(a) is not None:  # an actor's own stream: its first unit's old actor's
            st["rng"] = rng_of[a]
        st["units"] = [a, b]  # an actor checks it holds these (a stage ignores it)
        out.append(st)
    return out


def fit(saved: dict, run_dir, cuts: list[int] | None, units, actors: bool) -> dict | None:
    """`saved` (what an executor's save_state returned) as gathered stage states cut at
    `cuts` -- {"stages": [...], "recut": [old boundaries]} -- or None when it was cut
    there already by the same kind of executor (which loads it as it is).  cuts: the
    resuming executor's [0, ..., n_units], None for a per-layer graph; actors: whether
    it runs actors (their states add an RNG and their links' own channel states)."""
    by_actors = "stages" not in saved or "placement" in saved
    if cuts is None:  # a layer graph: only its own checkpoint fits (the executor checks)
        if by_actors and (_layout(saved, run_dir).get("placement") or {}).get("kind") == "layers":
            return None
        raise ConfigError("--resume: runtime.partition per_layer cannot take a checkpoint "
                          "written by stages of whole units; " + _WHY)
    old = saved_cuts(saved, cuts[-1], run_dir)
    if old == list(cuts) and by_actors == actors:
        return None
    if "channels" in saved:  # the in-process executor keeps its links' state apart
        raise ConfigError("--resume: the checkpoint has communication channels (each "
                          "link's state belongs to an edge of its cut); " + _WHY)
    states = saved["stages"] if "stages" in saved else read_actor_states(run_dir, saved)
    return {"stages": recut(states, old, list(cuts), unit_params(units)),
            "recut": old[1:-1]}
