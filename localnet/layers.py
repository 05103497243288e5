"""Layers that delegate their backward pass to a local rule.

`LocalLinear` and `LocalConv2d` hold W (and b) and initialise them by nn.Linear /
nn.Conv2d's scheme, drawn from the layer's own RNG; the rule adds its feedback state and
decides the backward.
`ErrorTap` marks a hidden layer's output (after its nonlinearity): DFA delivers its
projected output error there; every other rule passes the gradient through.

Models never see rule names: they build layers through `LayerFactory`, so one model
file serves every rule.

Every random draw of a layer -- W, b, feedback, and later noise -- comes from that
layer's own generator, seeded from (run seed, unit index, position in the unit).  So a
unit's initial state does not depend on which other units a process builds: a pipeline
actor builds only its own units and gets exactly the whole model's weights.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from .rules.base import ConvGeometry, LinearGeometry, LocalOp, Rule, draw_like_weights


class LocalLayer(nn.Module):
    """Common part of LocalLinear and LocalConv2d."""

    geometry: LinearGeometry | ConvGeometry
    rule: Rule

    def _attach(self, rule: Rule, seed: int, init: str) -> None:
        self.rule = rule
        # The layer's own RNG: W and b, feedback init, weight-mirror noise, brSF redraws.
        self.generator = torch.Generator().manual_seed(seed)
        self.init_scheme = init  # rules that draw feedback "like W" read it
        init_weights(self.weight, self.bias, self.generator, init)
        rule.init_layer(self)

    def forward(self, x):
        self.input_shape = tuple(x.shape[1:])  # weight mirror draws noise of this shape
        return LocalOp.apply(x, self.weight, self.bias, self.geometry, self.rule,
                             *self.rule.feedback_tensors(self, x))

    # RNG state travels with the checkpoint so a resumed run draws the same noise.
    def get_extra_state(self):
        return {"rng": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["rng"])


class LocalLinear(LocalLayer):
    def __init__(self, in_features, out_features, bias=True, *, rule: Rule, seed: int = 0,
                 init: str = "torch"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.in_features, self.out_features = in_features, out_features
        self.geometry = LinearGeometry()
        self._attach(rule, seed, init)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rule={self.rule.describe()}"


class LocalConv2d(LocalLayer):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, *, rule: Rule, seed: int = 0,
                 init: str = "torch"):
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                               *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.in_channels, self.out_channels = in_channels, out_channels
        self.geometry = ConvGeometry(_pair(stride), _pair(padding), _pair(dilation), groups)
        self._attach(rule, seed, init)

    def extra_repr(self):
        g = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, "
                f"stride={g.stride}, padding={g.padding}, groups={g.groups}, "
                f"rule={self.rule.describe()}")


class ErrorTap(nn.Module):
    """Identity in the forward pass; the place where DFA injects D_l e."""

    def __init__(self, rule: Rule, num_classes: int, seed: int = 0):
        super().__init__()
        self.rule, self.num_classes = rule, num_classes
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = None

    def forward(self, h):
        if self.shape is None:  # state whose shape depends on the activation (DFA's D)
            self.shape = tuple(h.shape[1:])
            self.rule.init_tap(self, self.shape, self.num_classes)
        return self.rule.tap(self, h)


def init_weights(weight: torch.Tensor, bias: torch.Tensor | None,
                 generator: torch.Generator, scheme: str = "torch") -> None:
    """W and b drawn from `generator` (`model.init`):
    torch   nn.Linear / nn.Conv2d's default (`reset_parameters`: Kaiming-uniform with
            a=sqrt(5), bias uniform in +-1/sqrt(fan_in))
    xavier  Xavier-uniform W and zero b, as BioTorch and the PFA authors' code
            (`init: xavier` in their experiment configs)"""
    draw_like_weights(weight, scheme, generator)
    if bias is not None:
        with torch.no_grad():
            if scheme == "xavier":
                bias.zero_()
            else:
                bound = 1 / math.sqrt(math.prod(weight.shape[1:]))
                bias.uniform_(-bound, bound, generator=generator)


UNIT_LAYERS = 1 << 12  # seeds per unit; no unit has this many layers and taps


def _mix32(x: int) -> int:
    """A bijective 32-bit integer hash (xor-shift-multiply), so different run seeds give
    a layer different seeds."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def unit_seed(seed: int, unit: int) -> int:
    """The seed of unit `unit`'s first layer in a run seeded `seed` (its k-th: ^ k).

    torch's CPU generator keeps only 32 bits of a seed, so the (unit, position) index
    takes 24 of them and is xor-ed with a hash of the run seed: distinct for every layer
    of a run (up to 4096 units), and different between runs for each layer."""
    if not 0 <= unit < 1 << 12:
        raise ValueError(f"unit index {unit} out of range for per-layer seeds")
    return _mix32(seed) ^ (int(unit) * UNIT_LAYERS)


class LayerFactory:
    """Builds rule-driven layers for one unit of a model; gives each a distinct seed that
    depends only on (run seed, unit, its position in the unit) -- see the module doc."""

    def __init__(self, rule: Rule, num_classes: int, seed: int = 0, unit: int = 0,
                 init: str = "torch"):
        self.rule, self.num_classes, self.seed, self.init = rule, num_classes, seed, init
        self._first = unit_seed(seed, unit)
        self._seeds = itertools.count()

    def for_unit(self, unit: int) -> "LayerFactory":
        return LayerFactory(self.rule, self.num_classes, self.seed, unit, self.init)

    def _next_seed(self) -> int:
        k = next(self._seeds)
        if k >= UNIT_LAYERS:
            raise ValueError(f"a unit has more than {UNIT_LAYERS} layers")
        return self._first ^ k

    def linear(self, in_features, out_features, bias=True):
        return LocalLinear(in_features, out_features, bias, rule=self.rule,
                           seed=self._next_seed(), init=self.init)

    def conv(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
             dilation=1, groups=1, bias=False):
        return LocalConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias, rule=self.rule, seed=self._next_seed(), init=self.init)

    def tap(self):
        return ErrorTap(self.rule, self.num_classes, seed=self._next_seed())


class TorchLayerFactory(LayerFactory):
    """Plain nn.Linear / nn.Conv2d and no taps: the same model in stock PyTorch, the
    baseline that benchmarks divide by."""

    def __init__(self, num_classes: int, seed: int = 0, unit: int = 0, init: str = "torch"):
        super().__init__(None, num_classes, seed, unit, init)

    def for_unit(self, unit: int) -> "TorchLayerFactory":
        return TorchLayerFactory(self.num_classes, self.seed, unit, self.init)

    def _seeded(self, layer: nn.Module) -> nn.Module:
        # the seed the rule-driven layer in this place would get, so both draw the same W
        init_weights(layer.weight, layer.bias, torch.Generator().manual_seed(self._next_seed()),
                     self.init)
        return layer

    def linear(self, in_features, out_features, bias=True):
        return self._seeded(nn.Linear(in_features, out_features, bias))

    def conv(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
             dilation=1, groups=1, bias=False):
        return self._seeded(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                      dilation, groups, bias))

    def tap(self):
        self._next_seed()  # a rule-driven tap takes a seed here
        return nn.Identity()


def local_layers(module: nn.Module):
    """(name, layer) for every rule-driven Linear/Conv in a module."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LocalLayer)]


def set_rule(module: nn.Module, rule: Rule) -> dict:
    """Point every layer and tap at `rule`; returns the old rules (for restore_rules)."""
    old = {}
    for n, m in module.named_modules():
        if isinstance(m, (LocalLayer, ErrorTap)):
            old[n], m.rule = m.rule, rule
    return old


def restore_rules(module: nn.Module, old: dict) -> None:
    for n, m in module.named_modules():
        if n in old:
            m.rule = old[n]
