"""A user's own models, as ``--arch tests.factories:NAME`` / ``--model tests.factories:NAME`` name them: a small
ResNet for 32 px images, and factories that fail in each way the loader words."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """A basic residual block: two 3x3 conv-BN, a 1x1 conv-BN shortcut when the shape changes, a sum, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Three stages of one block each (``width``, 2 x ``width``, 4 x ``width`` channels), global pooling, a head."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, 2)
        self.layer3 = Block(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))

    @classmethod
    def build(cls, num_classes: int = 10, width: int = 16) -> SmallResNet:
        """The same network through a dotted attribute: ``tests.factories:SmallResNet.build``."""
        return cls(num_classes, width)


def small_resnet(num_classes: int = 10, width: int = 16) -> nn.Module:
    """A 3-block ResNet for 32 px images (16/32/64 channels by default, so SE at r = 16 has a hidden width >= 1)."""
    return SmallResNet(num_classes, width)


# ---- factories that fail, one way each --------------------------------------------------------------------------

not_callable = 3


def no_num_classes(width: int = 16) -> nn.Module:
    """Takes no num_classes."""
    return SmallResNet(10, width)


def needs_depth(num_classes: int, depth: int) -> nn.Module:
    """A required parameter besides num_classes."""
    return SmallResNet(num_classes)


def returns_a_tuple(num_classes: int = 10) -> tuple[nn.Module, dict]:
    """Returns the model with its settings, not the model."""
    return SmallResNet(num_classes), {"width": 16}
