"""Models are ordered lists of units (stem, blocks, head).

A unit maps one tensor to one tensor, so a pipeline can cut the list anywhere and put
each piece on its own actor; `UnitModel.forward` is just the composition.  Layers come
from a `LayerFactory`, so the same model code serves every rule.
"""

from __future__ import annotations

import torch.nn as nn


class UnitModel(nn.Module):
    def __init__(self, units: list[nn.Module], names: list[str]):
        super().__init__()
        assert len(units) == len(names)
        self.units = nn.ModuleList(units)
        self.unit_names = list(names)

    def forward(self, x):
        for unit in self.units:
            x = unit(x)
        return x


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)
