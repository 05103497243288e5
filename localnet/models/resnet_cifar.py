"""CIFAR ResNets (He et al. 2016, sec. 4.2): 6n+2 layers, widths 16/32/64, and the
option-A shortcut -- stride-2 subsampling plus zero channel padding, no parameters.
"""

from collections import OrderedDict
from functools import partial

import torch.nn as nn
import torch.nn.functional as F

from ..layers import LayerFactory
from .base import Flatten, Merge, Part, UnitSpec, has_parameters


class PadShortcut(nn.Module):
    """Option A: x[:, :, ::2, ::2] zero-padded to the new width (no weights)."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class ConvBN(nn.Sequential):
    """conv -> BN (-> ReLU -> tap): a single layer, the finest unit the runtime places."""

    def __init__(self, f: LayerFactory, c_in, c_out, k=3, stride=1, relu=True):
        mods = [("conv", f.conv(c_in, c_out, k, stride, k // 2)), ("bn", nn.BatchNorm2d(c_out))]
        if relu:
            mods += [("relu", nn.ReLU(inplace=True)), ("tap", f.tap())]
        super().__init__(OrderedDict(mods))


class BasicBlock(nn.Module):
    def __init__(self, f: LayerFactory, c_in, c_out, stride, shortcut: nn.Module):
        super().__init__()
        self.conv1 = ConvBN(f, c_in, c_out, 3, stride)
        self.conv2 = ConvBN(f, c_out, c_out, 3, 1, relu=False)
        self.shortcut = shortcut
        self.tap = f.tap()

    def forward(self, x):
        return self.tap(F.relu(self.conv2(self.conv1(x)) + self.shortcut(x), inplace=True))

    def layer_nodes(self, own_shortcut: bool = True):
        """Layers for `UnitModel.layer_graph`: (suffix, module, inputs); an input is "in"
        (the block's input) or the index of an earlier node of this block.  conv1 reads
        the input; the merge reads conv1's output and the skip.  A shortcut with weights
        (option B) is a layer of its own, or with own_shortcut=False part of the merge."""
        return residual_nodes(self, ["conv1"], "conv2", own_shortcut)


def residual_nodes(block, chain: list[str], last: str, own_shortcut: bool = True):
    nodes = [(name, Part(**{name: getattr(block, name)}), ["in" if i == 0 else i - 1])
             for i, name in enumerate(chain)]
    skip = "in"
    shortcut = block.shortcut
    if own_shortcut and has_parameters(shortcut):
        nodes.append(("shortcut", Part(shortcut=shortcut), ["in"]))
        skip, shortcut = len(nodes) - 1, nn.Identity()
    nodes.append((last, Merge(last, getattr(block, last), shortcut, block.tap),
                  [len(chain) - 1, skip]))
    return nodes


def _cifar_block(f: LayerFactory, c_in, c_out, stride) -> BasicBlock:
    same = stride == 1 and c_in == c_out
    return BasicBlock(f, c_in, c_out, stride,
                      nn.Identity() if same else PadShortcut(stride, c_out - c_in))


class Head(nn.Sequential):
    def __init__(self, f: LayerFactory, c, num_classes):
        super().__init__(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=Flatten(),
                                     fc=f.linear(c, num_classes)))


def resnet_cifar(input_shape, num_classes, depth=20) -> list[UnitSpec]:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    units = [UnitSpec("stem", partial(ConvBN, c_in=input_shape[0], c_out=16))]
    c_in = 16
    for stage, c_out in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if (i == 0 and stage > 0) else 1
            units.append(UnitSpec(f"layer{stage + 1}.{i}",
                                  partial(_cifar_block, c_in=c_in, c_out=c_out, stride=stride)))
            c_in = c_out
    units.append(UnitSpec("head", partial(Head, c=c_in, num_classes=num_classes)))
    return units
