"""Model registry: `build_model(name, rule, input_shape, num_classes, seed, **kw)`."""

from __future__ import annotations

from functools import partial

import torch

from ..layers import LayerFactory, TorchLayerFactory
from ..rules import Rule
from .base import UnitModel
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
                **kwargs) -> UnitModel:
    """Deterministic in (name, rule, shapes, seed): every process that builds it gets the
    same weights, so a pipeline stage can build the model and keep only its units.
    rule=None builds the same network from stock nn.Linear/nn.Conv2d (plain backprop)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        factory = (TorchLayerFactory(num_classes, seed) if rule is None
                   else LayerFactory(rule, num_classes, seed))
        model = builder(factory, tuple(input_shape), num_classes, **kwargs)
    # One dry forward so state whose shape depends on activations (DFA's D_l) exists
    # before anything reads the state dict.
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, *input_shape))
    model.train(was_training)
    return model


__all__ = ["MODELS", "UnitModel", "build_model"]
