"""ImageNet-style ResNets (He et al. 2016): 7x7 stem with max-pool, basic or bottleneck
blocks, and 1x1 projection shortcuts (option B) where the shape changes.  The
projection is a rule-driven conv like every other.
"""

from functools import partial

import torch.nn as nn
import torch.nn.functional as F

from ..layers import LayerFactory
from .base import UnitSpec
from .resnet_cifar import BasicBlock, ConvBN, Head, residual_nodes


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, f: LayerFactory, c_in, width, stride, shortcut):
        super().__init__()
        self.conv1 = ConvBN(f, c_in, width, 1, 1)
        self.conv2 = ConvBN(f, width, width, 3, stride)
        self.conv3 = ConvBN(f, width, width * 4, 1, 1, relu=False)
        self.shortcut = shortcut
        self.tap = f.tap()

    def forward(self, x):
        return self.tap(F.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x), inplace=True))

    def layer_nodes(self, own_shortcut: bool = True):
        """conv1 -> conv2 -> merge(conv3, skip); see BasicBlock.layer_nodes."""
        return residual_nodes(self, ["conv1", "conv2"], "conv3", own_shortcut)


class Stem(nn.Sequential):
    def __init__(self, f: LayerFactory, c_in, small_input: bool):
        if small_input:  # 32x32 inputs: a 3x3 stem and no max-pool keep the spatial size useful
            super().__init__(ConvBN(f, c_in, 64, 3, 1))
        else:
            super().__init__(ConvBN(f, c_in, 64, 7, 2), nn.MaxPool2d(3, 2, 1))


_LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}


def _block(f: LayerFactory, kind, c_in, width, stride) -> nn.Module:
    c_out = width * (Bottleneck.expansion if kind == "bottleneck" else 1)
    shortcut = nn.Identity()
    if stride != 1 or c_in != c_out:
        shortcut = ConvBN(f, c_in, c_out, 1, stride, relu=False)
    if kind == "basic":
        return BasicBlock(f, c_in, c_out, stride, shortcut)
    return Bottleneck(f, c_in, width, stride, shortcut)


def resnet_imagenet(input_shape, num_classes, depth=18) -> list[UnitSpec]:
    kind, counts = _LAYOUTS[depth]
    expansion = Bottleneck.expansion if kind == "bottleneck" else 1
    units = [UnitSpec("stem", partial(Stem, c_in=input_shape[0],
                                      small_input=input_shape[-1] <= 64))]
    c_in = 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), counts)):
        for i in range(count):
            stride = 2 if (i == 0 and stage > 0) else 1
            units.append(UnitSpec(f"layer{stage + 1}.{i}", partial(
                _block, kind=kind, c_in=c_in, width=width, stride=stride)))
            c_in = width * expansion
    units.append(UnitSpec("head", partial(Head, c=c_in, num_classes=num_classes)))
    return units
