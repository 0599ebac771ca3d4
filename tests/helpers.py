"""Helpers shared by the tests (not a test module): toy data loaders, a hostile pickle, the one-line-error check."""

from __future__ import annotations

import pathlib
from typing import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from .models import TinySENet


class LabelledImages(TensorDataset):
    """A TensorDataset with the ``classes`` attribute of torchvision datasets."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
        super().__init__(images, labels)
        self.classes = classes
        self.targets = labels.tolist()


def make_loader(n: int = 60, num_classes: int = 4, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """Random 3x16x16 images whose brightness depends on the class, so excitations differ between classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randn(n, 3, 16, 16, generator=g) + labels.view(-1, 1, 1, 1).float()
    dataset = LabelledImages(images, labels, [f"class{k}" for k in range(num_classes)])
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def seeded_model(seed: int = 0, **kwargs) -> TinySENet:
    torch.manual_seed(seed)
    return TinySENet(**kwargs)


class Payload:
    """Unpickling this creates a marker file: the code a hostile checkpoint or weights file would run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def one_line_error(main: Callable[[list[str]], int], capsys, args: list[str]) -> str:
    """Run a CLI's ``main`` on bad input: it must exit 2 with one line on stderr, no traceback; returns the line."""
    try:
        code = main([*args, "--no-progress"])
    except SystemExit as exit_info:  # argparse's own usage errors
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err
