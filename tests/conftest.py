"""Shared fixtures, and the ``cuda`` marker: tests marked ``cuda`` need a CUDA GPU and are skipped without one
(benchmarks/gpu_check.py runs them)."""

import pytest
import torch
import torchvision
from torch import nn

from .models import TinySENet


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (python benchmarks/gpu_check.py runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def resnet18_10() -> nn.Module:
    """A ResNet-18 for 10 classes, the same random weights in every test (seed 0)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture
def tiny_senet() -> TinySENet:
    """The analysis tests' three-SE-block network (``layer1.0.se``, ``layer1.1.se``, ``layer2.0.se``), seed 0."""
    torch.manual_seed(0)
    return TinySENet()
