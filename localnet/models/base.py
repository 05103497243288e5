"""Models are ordered lists of units (stem, blocks, head).

A unit maps one tensor to one tensor, so a pipeline can cut the list anywhere and put
each piece on its own actor; `UnitModel.forward` is just the composition.  Layers come
from a `LayerFactory`, so the same model code serves every rule.

A model file returns `UnitSpec`s -- a name and a function that builds the unit from a
factory -- rather than built modules, so a pipeline actor can build only its own units
(`build_model(..., units=...)`); the others stay `Absent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class UnitSpec:
    name: str
    build: Callable[..., nn.Module]  # build(factory) -> the unit


class Absent(nn.Module):
    """A unit this process did not build (it lives on another actor)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        raise RuntimeError(f"unit {self.name!r} was not built in this process")


class UnitModel(nn.Module):
    def __init__(self, units: list[nn.Module], names: list[str]):
        super().__init__()
        assert len(units) == len(names)
        self.units = nn.ModuleList(units)
        self.unit_names = list(names)
        # Where the layer graph may cut a unit.  A rule that delivers every hidden
        # layer's error at its error tap and sends none down (DFA) leaves a layer that
        # ends without a tap -- a projection shortcut, whose error is the merge's --
        # with no error at all on an actor of its own: such a layer stays in the node
        # that reads it.  `build_model` sets it from the rule.
        self.cut_only_at_taps = False

    def forward(self, x):
        for unit in self.units:
            x = unit(x)
        return x

    def unit_layers(self, u: int) -> list["LayerNode"]:
        """Unit u's nodes of the layer graph, their inputs numbered within the unit
        (-1: the unit's input).  A unit with a `layer_nodes()` method (a residual block)
        splits into its layers; any other unit (stem, head, an MLP layer) is one node.
        With `cut_only_at_taps`, a block's projection shortcut is part of its merge's
        node rather than a node of its own."""
        unit, name = self.units[u], self.unit_names[u]
        if isinstance(unit, Absent):
            raise RuntimeError(f"unit {name!r} was not built in this process")
        parts = (unit.layer_nodes(own_shortcut=not self.cut_only_at_taps)
                 if hasattr(unit, "layer_nodes") else [("", unit, ["in"])])
        return [LayerNode(f"{name}.{suffix}" if suffix else name, u, name, module,
                          [-1 if i == "in" else int(i) for i in inputs])
                for suffix, module, inputs in parts]

    def layer_graph(self) -> list["LayerNode"]:
        """The finer graph the runtime's `partition: per_layer` places, one node per layer.

        Nodes share their modules with the units (no copies), in topological order; the
        last one is the output.  Composing them (`run_layer_graph`) is exactly `forward`."""
        nodes: list[LayerNode] = []
        prev = -1  # the node whose output is the current unit's input (-1: the model input)
        for u in range(len(self.units)):
            base = len(nodes)
            for n in self.unit_layers(u):
                n.inputs = [prev if i < 0 else base + i for i in n.inputs]
                nodes.append(n)
            prev = len(nodes) - 1
        return nodes


@dataclass
class LayerNode:
    """One node of a model's layer graph.

    name:   "layer1.0.conv1"; a whole unit's node is named like the unit
    unit:   index of the unit it belongs to; unit_name its name
    module: its part of the unit, submodules under their paths *within the unit*, so
            its state-dict keys are the model's keys minus "units.<unit>."
    inputs: node ids it reads, in order (-1: the model input); two inputs are a merge
    """

    name: str
    unit: int
    unit_name: str
    module: nn.Module
    inputs: list[int]


def run_layer_graph(nodes: list[LayerNode], x):
    outs = []
    for n in nodes:
        outs.append(n.module(*[x if i < 0 else outs[i] for i in n.inputs]))
    return outs[-1]


class Part(nn.Module):
    """Some submodules of a unit, under their names in the unit, applied in order."""

    def __init__(self, **modules: nn.Module):
        super().__init__()
        for k, m in modules.items():
            self.add_module(k, m)

    def forward(self, x):
        for m in self.children():
            x = m(x)
        return x


class Merge(nn.Module):
    """Where a residual block's two branches meet: tap(relu(main(h) + shortcut(skip))).

    `main` is the block's last conv (conv2 / conv3), h its input; `skip` is the block's
    input (or a projection shortcut's output, which is then a node of its own and
    `shortcut` the identity).  Same operations, in the same order, as the block."""

    def __init__(self, main_name: str, main: nn.Module, shortcut: nn.Module, tap: nn.Module):
        super().__init__()
        self.main_name = main_name
        self.add_module(main_name, main)
        self.shortcut = shortcut
        self.tap = tap

    def forward(self, h, skip):
        return self.tap(F.relu(getattr(self, self.main_name)(h) + self.shortcut(skip), inplace=True))


def has_parameters(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)
