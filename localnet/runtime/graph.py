"""The actor graph: which part of the model each actor holds, and how actors connect.

`Placement` says which part of the model each actor holds and how actors connect:

    kind     "units": actor i holds a contiguous group of units (per_unit, {stages: N},
             explicit boundaries or groups) -- a chain, one input each;
             "layers": actor i holds one node of the model's layer graph (per_layer) --
             a DAG, where a residual block's merge node has two inputs
    members  per actor: (a, b) unit range, or the layer-graph node id
    inputs   per actor: producer actors in input order (-1: the driver's batch)

Actors are numbered in topological order; the last one (the sink) computes the loss.
Activations travel along every edge p -> c; errors travel back c -> p, and an actor
with several consumers (the block input feeding conv1 and the skip) sums the errors it
receives -- autograd's sum over a tensor's uses, done across actors.

The stage an actor runs is `stage.NodeStage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.base import Absent


@dataclass
class Placement:
    kind: str                      # "units" | "layers"
    members: list                  # per actor: [a, b] or node id
    names: list[list[str]]         # per actor: unit names, or [node name]
    inputs: list[list[int]]        # per actor: producer actors (-1: driver)
    spec: str = "per_unit"         # how it was asked for (for runtime_info)
    consumers: list[list[tuple[int, int]]] = field(init=False, repr=False)

    def __post_init__(self):
        S = len(self.members)
        if not (len(self.names) == len(self.inputs) == S) or S == 0:
            raise ValueError("placement: members, names and inputs need one entry per actor")
        self.consumers = [[] for _ in range(S)]
        for c, ins in enumerate(self.inputs):
            if not ins:
                raise ValueError(f"placement: actor {c} has no input")
            for slot, p in enumerate(ins):
                if not -1 <= p < c:
                    raise ValueError(f"placement: actor {c} reads actor {p}: actors must be "
                                     f"in topological order")
                if p >= 0:
                    self.consumers[p].append((c, slot))
        dangling = [s for s in range(S - 1) if not self.consumers[s]]
        if dangling:
            raise ValueError(f"placement: actors {dangling} feed nobody; only the last may")
        if -1 not in self.inputs[0]:
            raise ValueError("placement: actor 0 must read the driver's batch")

    # -- shape ------------------------------------------------------------------------
    @property
    def num_actors(self) -> int:
        return len(self.members)

    @property
    def sink(self) -> int:
        return self.num_actors - 1

    @property
    def is_chain(self) -> bool:
        return all(ins == [s - 1] for s, ins in enumerate(self.inputs))

    def edges(self) -> list[tuple[int, int]]:
        return [(p, c) for c, ins in enumerate(self.inputs) for p in ins if p >= 0]

    @property
    def boundaries(self) -> list[int] | None:
        if self.kind != "units":
            return None
        return [int(a) for a, _ in self.members[1:]]

    def link_names(self, j: int, unit_names: list[str]) -> tuple:
        """How communication channels name actor j's ends: (first name, last name,
        boundary below j, boundary above j) -- its first and last unit and the unit
        indices of the cuts around it, or per layer its node's name and no boundaries."""
        if self.kind != "units":
            return self.names[j][0], self.names[j][0], None, None
        a, b = self.members[j]
        return unit_names[a], unit_names[b - 1], a, b

    def links(self, unit_names: list[str]) -> list[tuple]:
        """(boundary, lower name, upper name) of every edge: what `channel.edges` keys."""
        return [(self.link_names(c, unit_names)[2], self.link_names(p, unit_names)[1],
                 self.link_names(c, unit_names)[0]) for p, c in self.edges()]

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_boundaries(cls, boundaries: list[int], unit_names: list[str],
                        spec: str = "per_unit") -> "Placement":
        cuts = [0] + list(boundaries) + [len(unit_names)]
        members = [[a, b] for a, b in zip(cuts[:-1], cuts[1:])]
        return cls("units", members, [unit_names[a:b] for a, b in members],
                   [[s - 1] for s in range(len(members))], spec)

    @classmethod
    def from_layers(cls, nodes) -> "Placement":
        return cls("layers", list(range(len(nodes))), [[n.name] for n in nodes],
                   [list(n.inputs) for n in nodes], "per_layer")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "members": [m if isinstance(m, int) else list(m)
                                               for m in self.members],
                "names": self.names, "inputs": self.inputs, "spec": self.spec}

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        return cls(d["kind"], list(d["members"]), [list(n) for n in d["names"]],
                   [list(i) for i in d["inputs"]], d.get("spec", "per_unit"))

    def stage_members(self) -> list[tuple]:
        """What each actor holds, as a resume re-cuts it (localnet/recut.py):
        ("units", a, b), or ("node", layer name)."""
        if self.kind == "units":
            return [("units", int(a), int(b)) for a, b in self.members]
        return [("node", names[0]) for names in self.names]

    def same_layout(self, other: "Placement") -> bool:
        return (self.kind, [list(m) if not isinstance(m, int) else m for m in self.members],
                self.inputs) == (other.kind, [list(m) if not isinstance(m, int) else m
                                              for m in other.members], other.inputs)


def actor_units(placement: Placement, model) -> list[list[int]]:
    """Per actor: the units it must build (a node of the layer graph needs its unit)."""
    if placement.kind == "units":
        return [list(range(a, b)) for a, b in placement.members]
    nodes = model.layer_graph()
    return [[nodes[m].unit] for m in placement.members]


def modules_for(placement: Placement, index: int, model, shapes):
    """(modules, names, unit ids, per-slot input shapes, output shape) of one actor, the
    shapes per sample.  `model` is a UnitModel with at least this actor's units built
    (`actor_units`); the modules are its own.  shapes: `models.unit_shapes` -- each
    unit's input shape, then the model's output shape."""
    if placement.kind == "units":
        a, b = placement.members[index]
        return (list(model.units[a:b]), list(model.unit_names[a:b]), list(range(a, b)),
                [tuple(shapes[a])], tuple(shapes[b]))
    want = placement.names[index][0]
    for u, unit in enumerate(model.units):
        if want != model.unit_names[u] and not want.startswith(model.unit_names[u] + "."):
            continue
        if isinstance(unit, Absent):
            break
        nodes = model.unit_layers(u)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():  # the shapes of this unit's nodes, from its input's
                x, outs = torch.zeros(2, *shapes[u]), []
                for n in nodes:
                    ins = [x if i < 0 else outs[i] for i in n.inputs]
                    if n.name == want:
                        return ([n.module], [n.unit_name], [u],
                                [tuple(t.shape[1:]) for t in ins],
                                tuple(n.module(*ins).shape[1:]))
                    outs.append(n.module(*ins))
        finally:
            model.train(was)
    raise ValueError(f"placement names node {want!r}, which this model does not build")
