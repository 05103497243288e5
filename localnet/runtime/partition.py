"""Which units go to which actor: `runtime.partition` -> a `Placement` (graph.py).

Boundaries are cut points between units, as for `InProcessExecutor(boundaries=...)`:
[2, 5] with 8 units gives stages [0, 2), [2, 5), [5, 8).

  per_unit                    one stage per unit (a residual block, the stem, the head)
  per_layer                   one actor per layer of the model's layer graph: a residual
                              block becomes conv1 and its merge (conv2 + skip -> relu),
                              and the skip an edge between actors
  {stages: N, balance: params} N consecutive groups, balanced by parameter count
  {stages: N, balance: cost}  ... by measured forward+backward time per unit
  [b1, b2, ...]               explicit boundaries
  [[stem, layer1.0], [...]]   explicit groups: consecutive unit names (or indices)
"""

from __future__ import annotations

from ..errors import ConfigError


def balanced_boundaries(weights: list[float], n: int) -> list[int]:
    """Cut `weights` (one per unit) into n contiguous non-empty groups minimising the
    heaviest group (exact dynamic programme; ties go to the earliest cut)."""
    k = len(weights)
    if not 1 <= n <= k:
        raise ValueError(f"cannot split {k} units into {n} stages")
    pre = [0.0]
    for w in weights:
        pre.append(pre[-1] + float(w))
    inf = float("inf")
    # best[j][i]: minimal max-group weight splitting units[:i] into j groups
    best = [[inf] * (k + 1) for _ in range(n + 1)]
    cut = [[0] * (k + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for j in range(1, n + 1):
        for i in range(j, k - (n - j) + 1):
            for c in range(j - 1, i):
                v = max(best[j - 1][c], pre[i] - pre[c])
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, c
    bounds, i = [], k
    for j in range(n, 0, -1):
        i = cut[j][i]
        bounds.append(i)
    return sorted(bounds)[1:]  # drop the leading 0


def resolve_partition(spec, num_units: int, params_per_unit: list[int] | None = None,
                      cost_per_unit=None) -> list[int]:
    """Boundaries for a `runtime.partition` value (see module doc).  `cost_per_unit` may
    be a list or a zero-argument callable (measured only when needed)."""
    if spec is None or spec == "per_unit":
        return list(range(1, num_units))
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(g, (list, tuple)) for g in spec):
        raise ValueError("runtime.partition: explicit groups need the unit names; use "
                         "resolve_placement")
    if isinstance(spec, (list, tuple)):
        bounds = [int(b) for b in spec]
        if any(not 0 < b < num_units for b in bounds) or bounds != sorted(set(bounds)):
            raise ConfigError(f"runtime.partition: boundaries {bounds} must be strictly "
                             f"increasing and within 1..{num_units - 1} ({num_units} units)")
        return bounds
    stages = getattr(spec, "stages", None) or (spec.get("stages") if isinstance(spec, dict) else None)
    balance = getattr(spec, "balance", None) or (spec.get("balance", "params") if isinstance(spec, dict) else "params")
    if stages is None:
        raise ValueError(f"runtime.partition: cannot interpret {spec!r}")
    if stages > num_units:
        raise ConfigError(f"runtime.partition.stages={stages} exceeds the model's {num_units} units")
    if balance == "cost":
        weights = cost_per_unit() if callable(cost_per_unit) else cost_per_unit
    else:
        weights = params_per_unit
    if weights is None:
        raise ValueError(f"runtime.partition: balance={balance!r} needs per-unit weights")
    return balanced_boundaries(list(weights), stages)


def groups(boundaries: list[int], num_units: int) -> list[tuple[int, int]]:
    cuts = [0] + list(boundaries) + [num_units]
    return list(zip(cuts[:-1], cuts[1:]))


def groups_to_boundaries(spec, unit_names: list[str]) -> list[int]:
    """[[stem, layer1.0], [layer1.1, ...], ...] (names or indices) -> boundaries.  The
    groups must list every unit once, in order.  What a config cannot know before the
    model is built (its units' names and number) is a ConfigError here."""
    flat = []
    for g in spec:
        if not g:
            raise ConfigError("runtime.partition: an empty group")
        for u in g:
            if isinstance(u, str):
                if u not in unit_names:
                    raise ConfigError(f"runtime.partition: no unit named {u!r}; units are "
                                     f"{unit_names}")
                flat.append(unit_names.index(u))
            else:
                flat.append(int(u))
    if flat != list(range(len(unit_names))):
        raise ConfigError(f"runtime.partition: groups must cover the units {unit_names} "
                         f"once each, in order")
    bounds, n = [], 0
    for g in spec[:-1]:
        n += len(g)
        bounds.append(n)
    return bounds


def resolve_placement(spec, model, cost_per_unit=None):
    """`runtime.partition` -> Placement for a built UnitModel."""
    from .graph import Placement

    if spec == "per_layer":
        return Placement.from_layers(model.layer_graph())
    names = list(model.unit_names)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(g, (list, tuple)) for g in spec):
        return Placement.from_boundaries(groups_to_boundaries(spec, names), names, "groups")
    params = [sum(p.numel() for p in u.parameters()) for u in model.units]
    bounds = resolve_partition(spec, len(names), params, cost_per_unit)
    label = (spec if isinstance(spec, str) else "boundaries" if isinstance(spec, (list, tuple))
             else f"stages={getattr(spec, 'stages', None) or spec.get('stages')}")
    return Placement.from_boundaries(bounds, names, str(label))
