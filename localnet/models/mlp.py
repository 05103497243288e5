"""Multilayer perceptron; 784-512-512-10 with ReLU is PFA's MNIST network."""

import math
from collections import OrderedDict

import torch.nn as nn

from ..layers import LayerFactory
from .base import Flatten, UnitModel


class HiddenLayer(nn.Sequential):
    """(flatten ->) Linear -> ReLU -> error tap: one unit."""

    def __init__(self, f: LayerFactory, n_in: int, n_out: int, flatten: bool = False):
        mods = [("flatten", Flatten())] if flatten else []
        mods += [("linear", f.linear(n_in, n_out)), ("relu", nn.ReLU()), ("tap", f.tap())]
        super().__init__(OrderedDict(mods))


def mlp(f: LayerFactory, input_shape, num_classes, widths=(512, 512)) -> UnitModel:
    n_in = math.prod(input_shape)
    units, names = [], []
    for i, w in enumerate(widths):
        units.append(HiddenLayer(f, n_in, w, flatten=(i == 0)))
        names.append(f"fc{i + 1}")
        n_in = w
    head = f.linear(n_in, num_classes)
    units.append(head if widths else nn.Sequential(OrderedDict(flatten=Flatten(), linear=head)))
    names.append("head")
    return UnitModel(units, names)
