"""Layers that delegate their backward pass to a local rule.

`LocalLinear` and `LocalConv2d` hold W (and b) and initialise them exactly like
nn.Linear / nn.Conv2d; the rule adds its feedback state and decides the backward.
`ErrorTap` marks a hidden layer's output (after its nonlinearity): DFA delivers its
projected output error there; every other rule passes the gradient through.

Models never see rule names: they build layers through `LayerFactory`, so one model
file serves every rule.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from .rules.base import ConvGeometry, LinearGeometry, LocalOp, Rule


class LocalLayer(nn.Module):
    """Common part of LocalLinear and LocalConv2d."""

    geometry: LinearGeometry | ConvGeometry
    rule: Rule

    def _attach(self, rule: Rule, seed: int) -> None:
        self.rule = rule
        # The layer's own RNG: feedback init, weight-mirror noise and brSF redraws.
        self.generator = torch.Generator().manual_seed(seed)
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
    def __init__(self, in_features, out_features, bias=True, *, rule: Rule, seed: int = 0):
        super().__init__()
        ref = nn.Linear(in_features, out_features, bias=bias)  # borrow torch's init
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        self.in_features, self.out_features = in_features, out_features
        self.geometry = LinearGeometry()
        self._attach(rule, seed)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rule={self.rule.describe()}"


class LocalConv2d(LocalLayer):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, *, rule: Rule, seed: int = 0):
        super().__init__()
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                        dilation, groups, bias)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.geometry = ConvGeometry(_pair(stride), _pair(padding), _pair(dilation), groups)
        self._attach(rule, seed)

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


class LayerFactory:
    """Builds rule-driven layers for a model; gives each a distinct, reproducible seed."""

    def __init__(self, rule: Rule, num_classes: int, seed: int = 0):
        self.rule, self.num_classes = rule, num_classes
        self._seeds = itertools.count(seed * 100_003 + 1)

    def linear(self, in_features, out_features, bias=True):
        return LocalLinear(in_features, out_features, bias, rule=self.rule, seed=next(self._seeds))

    def conv(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
             dilation=1, groups=1, bias=False):
        return LocalConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias, rule=self.rule, seed=next(self._seeds))

    def tap(self):
        return ErrorTap(self.rule, self.num_classes, seed=next(self._seeds))


class TorchLayerFactory(LayerFactory):
    """Plain nn.Linear / nn.Conv2d and no taps: the same model in stock PyTorch, the
    baseline that benchmarks divide by."""

    def __init__(self, num_classes: int, seed: int = 0):
        self.num_classes = num_classes

    def linear(self, in_features, out_features, bias=True):
        return nn.Linear(in_features, out_features, bias)

    def conv(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
             dilation=1, groups=1, bias=False):
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias)

    def tap(self):
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
