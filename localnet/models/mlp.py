"""Multilayer perceptron; 784-512-512-10 with ReLU is PFA's MNIST network."""

import math
from collections import OrderedDict
from functools import partial

import torch.nn as nn

from ..layers import LayerFactory
from .base import Flatten, UnitSpec


class HiddenLayer(nn.Sequential):
    """(flatten ->) Linear -> ReLU -> error tap: one unit."""

    def __init__(self, f: LayerFactory, n_in: int, n_out: int, flatten: bool = False):
        mods = [("flatten", Flatten())] if flatten else []
        mods += [("linear", f.linear(n_in, n_out)), ("relu", nn.ReLU(inplace=True)), ("tap", f.tap())]
        super().__init__(OrderedDict(mods))


def _head(f: LayerFactory, n_in: int, num_classes: int, flatten: bool) -> nn.Module:
    head = f.linear(n_in, num_classes)
    return nn.Sequential(OrderedDict(flatten=Flatten(), linear=head)) if flatten else head


def mlp(input_shape, num_classes, widths=(512, 512)) -> list[UnitSpec]:
    n_in = math.prod(input_shape)
    units = []
    for i, w in enumerate(widths):
        units.append(UnitSpec(f"fc{i + 1}", partial(HiddenLayer, n_in=n_in, n_out=w,
                                                     flatten=(i == 0))))
        n_in = w
    units.append(UnitSpec("head", partial(_head, n_in=n_in, num_classes=num_classes,
                                          flatten=not widths)))
    return units
