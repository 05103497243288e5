"""Model registry: `build_model(name, rule, input_shape, num_classes, seed, **kw)`."""

from __future__ import annotations

from functools import partial

import torch

from ..layers import LayerFactory, TorchLayerFactory
from ..rules import Rule
from .base import Absent, UnitModel
from .mlp import mlp
from .resnet_cifar import resnet_cifar
from .resnet_imagenet import resnet_imagenet

MODELS = {
    "mlp": mlp,
    "resnet8": partial(resnet_cifar, depth=8),    # one block per width: a small test model
    "resnet20": partial(resnet_cifar, depth=20),
    "resnet32": partial(resnet_cifar, depth=32),
    "resnet44": partial(resnet_cifar, depth=44),
    "resnet56": partial(resnet_cifar, depth=56),
    "resnet110": partial(resnet_cifar, depth=110),
    "resnet18": partial(resnet_imagenet, depth=18),
    "resnet34": partial(resnet_imagenet, depth=34),
    "resnet50": partial(resnet_imagenet, depth=50),
}


def build_model(name: str, rule: Rule | None, input_shape, num_classes: int, seed: int = 0,
                units=None, unit_shapes=None, init: str = "torch", **kwargs) -> UnitModel:
    """Deterministic in (name, rule, shapes, seed); each unit's weights depend only on the
    seed and the unit's index (layers.py), so a pipeline actor builds only its own units
    and gets exactly the whole model's.  rule=None builds the same network from stock
    nn.Linear/nn.Conv2d (plain backprop).

    init: "torch" or "xavier" (`model.init`; layers.init_weights).
    units: indices of the units to build (default: all); the others are `Absent`.  Then
    unit_shapes[u], each built unit's input shape per sample, is needed too (a dry
    forward through each unit creates the state whose shape depends on activations)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    specs = builder(tuple(input_shape), num_classes, **kwargs)
    keep = range(len(specs)) if units is None else sorted(set(int(u) for u in units))
    if units is not None and unit_shapes is None:
        raise ValueError("build_model: building some units needs unit_shapes")
    # the global RNG is left alone (stock nn layers draw from it before being re-seeded)
    with torch.random.fork_rng(devices=[]):
        factory = (TorchLayerFactory(num_classes, seed, init=init) if rule is None
                   else LayerFactory(rule, num_classes, seed, init=init))
        mods = [spec.build(factory.for_unit(u)) if u in keep else Absent(spec.name)
                for u, spec in enumerate(specs)]
    model = UnitModel(mods, [spec.name for spec in specs])
    model.cut_only_at_taps = bool(rule is not None and rule.broadcast_output_error)
    # One dry forward so state whose shape depends on activations (DFA's D_l) exists
    # before anything reads the state dict.
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if units is None:
            model(torch.zeros(2, *input_shape))
        else:
            for u in keep:
                model.units[u](torch.zeros(2, *unit_shapes[u]))
    model.train(was_training)
    return model


def unit_shapes(model: UnitModel, input_shape) -> list[tuple]:
    """Each unit's input shape per sample, then the model's output shape (a dry forward
    of a whole model)."""
    shapes, h = [], torch.zeros(2, *input_shape)
    was = model.training
    model.eval()
    with torch.no_grad():
        for unit in model.units:
            shapes.append(tuple(h.shape[1:]))
            h = unit(h)
    model.train(was)
    return shapes + [tuple(h.shape[1:])]


__all__ = ["MODELS", "UnitModel", "build_model", "unit_shapes"]
