"""Per-draw and per-step seeds, so that training randomness depends on where a run is, not on what ran before.

Each training image's augmentation is seeded from ``(seed, epoch, position in the epoch's global stream)``, so the
same draw gets the same crop whatever rank or DataLoader worker makes it, and a resumed run makes it again.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .sampling import ClassAwareSampler, ShuffleSampler

__all__ = ["seed_of", "SeededDraws", "SeededDataset"]


def seed_of(*parts: int) -> int:
    """A 63-bit seed from a few integers (deterministic across processes, unlike hash() of strings)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 0x100000001B3 ^ (part & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
    return value >> 1


class SeededDraws(torch.utils.data.Sampler):
    """Pairs each index the sampler yields with a seed from ``(seed, epoch, global stream position)``."""

    def __init__(self, sampler: ClassAwareSampler | ShuffleSampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        s = self.sampler
        start = s.position + s.rank
        for k, index in enumerate(s):
            yield index, seed_of(s.seed, s.epoch, start + k * s.num_replicas)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDataset(Dataset):
    """Applies ``dataset[index]`` under its own seed, leaving the caller's RNG state as it was."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed would also queue a CUDA seed with a formatted stack trace
            # while CUDA is uninitialised (~0.3 ms a call, more than the image's own transform).
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)
