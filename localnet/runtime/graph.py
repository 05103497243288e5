"""The actor graph, and the stage an actor runs.

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

`NodeStage` is `engine.Stage` for one actor: several inputs, a device, and weight
stashing for the async schedule (each micro-batch's forward and backward see the same
weights, while updates land on the live ones).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine import Stage
from ..models.base import Absent
from ..rules import output_error


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


# ------------------------------------------------------------------------------ stage
class _Chain(nn.Sequential):
    """nn.Sequential whose first module takes every input (a merge node takes two)."""

    def forward(self, *xs):
        it = iter(self)
        h = next(it)(*xs)
        for m in it:
            h = m(h)
        return h


class NodeStage(Stage):
    """`engine.Stage` for one actor of the graph.

    forward(x, mb, rest)  x: first input, rest: the others (a merge's skip); -> y
    backward(dy, mb, e)   -> one error per input (None where the input is data)
    Everything else (step, mirror_steps, alignment, state_dict, ...) is Stage's.

    device: the module lives there; inputs are moved there; outputs stay there (the
    worker turns them into CPU numpy payloads).  stash: weight stashing (see module doc).
    """

    def __init__(self, modules: list[nn.Module], optim, names: list[str], *,
                 grad_inputs: list[bool], device="cpu", stash: bool = False):
        self.device = torch.device(device)
        for m in modules:
            m.to(self.device)
        super().__init__(modules, optim, first=not any(grad_inputs), names=names)
        self.module = _Chain(*modules)  # the same modules under the same keys
        self.grad_inputs = list(grad_inputs)
        self.stash = bool(stash)
        skip = {f"{n}.{b}" if n else b for n, m in self.module.named_modules()
                if isinstance(m, _BatchNorm) for b, _ in m.named_buffers(recurse=False)}
        self._stashable_buffers = [n for n, _ in self.module.named_buffers() if n not in skip]
        self._snap: dict | None = None
        self._snap_versions: dict = {}
        self._mutations = 0  # bumped by every update: fused SGD leaves version counters alone
        self._snap_mutations = -1

    # -- data path --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mb=0, rest=()) -> torch.Tensor:
        xs = [t.to(self.device).detach().requires_grad_(g)
              for t, g in zip((x, *rest), self.grad_inputs)]
        if self.stash:
            snap = self._snapshot()
            y = torch.func.functional_call(self.module, snap, tuple(xs), strict=False)
        else:
            snap, y = None, self.module(*xs)
        self._pending[mb] = (xs, y, snap)
        return y.detach()

    def backward(self, grad_y, mb=0, e=None):
        xs, y, snap = self._pending.pop(mb)
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y.to(self.device)
        ctx = output_error(e.to(self.device)) if e is not None else contextlib.nullcontext()
        with ctx:
            y.backward(grad_y)
        if snap is not None:
            self._collect(snap)
        return [x.grad if g else None for x, g in zip(xs, self.grad_inputs)]

    @torch.no_grad()
    def infer(self, x, rest=()):
        return self.module(*[t.to(self.device) for t in (x, *rest)])

    # -- weight stashing (async) --------------------------------------------------------
    def _snapshot(self) -> dict:
        """Copies of the parameters (and of buffers other than BatchNorm's running
        statistics) as they are now.  Parameters are copied again after every update
        (the fused optimizer does not bump torch's version counters); a buffer is
        copied again when its version counter moved (a weight-mirror step), so constant
        feedback (DFA's D, PFA's B_p) is copied once.  Between two updates micro-batches
        share one snapshot."""
        params = dict(self.module.named_parameters())
        bufs = dict(self.module.named_buffers())
        prev, versions = self._snap or {}, {}
        fresh = self._snap_mutations != self._mutations
        if not fresh and prev:
            if all(self._snap_versions.get(n) == bufs[n]._version
                   for n in self._stashable_buffers):
                return prev
        snap = {}
        for n, p in params.items():
            snap[n] = (p.detach().clone().requires_grad_(p.requires_grad)
                       if fresh or n not in prev else prev[n])
        for n in self._stashable_buffers:
            b = bufs[n]
            versions[n] = b._version
            snap[n] = prev[n] if n in prev and self._snap_versions.get(n) == b._version \
                else b.detach().clone()
        self._snap, self._snap_versions, self._snap_mutations = snap, versions, self._mutations
        return snap

    def _collect(self, snap: dict) -> None:
        """Move gradients from the stashed copies onto the live parameters."""
        for n, p in self.module.named_parameters():
            s = snap.get(n)
            if s is not None and s.grad is not None:
                p.grad = s.grad if p.grad is None else p.grad + s.grad
                s.grad = None

    def drop_snapshot(self) -> None:
        self._snap, self._snap_versions, self._snap_mutations = None, {}, -1

    def step(self, lr: float, weight_decay: float) -> None:
        super().step(lr, weight_decay)
        self._mutations += 1

    def mirror_steps(self, n: int) -> None:
        super().mirror_steps(n)
        self._mutations += 1

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.drop_snapshot()

    def transported_bytes(self) -> int:
        """Bytes of forward weights this stage's backward reads, under a rule that
        transports weights (bp): what a separate feedback pathway would need after
        every update.  0 for every other rule."""
        return sum(layer.weight.numel() * layer.weight.element_size()
                   for _, layer in self.layers if layer.rule.transports_weights)
