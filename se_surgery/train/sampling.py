"""Samplers whose epochs are pure functions of ``(seed, epoch)``, sharded across ranks and resumable mid-epoch.

:class:`ClassAwareSampler` is the class-aware ("balanced data") sampling the SENet paper took from Relay
Backpropagation (Shen et al., ECCV 2016): one list of classes and one list of images per class; each draw takes the
next class from the class list, then the next image from that class's list; a list that runs out is reshuffled and
restarted. Every class is therefore drawn equally often, however imbalanced the data.

Both samplers here first build the whole *global* epoch stream (what a single process would draw), then give rank
``r`` of ``R`` the items ``r, r + R, r + 2R, ...`` of it. The streams of all ranks together are thus exactly the
single-process stream, so a run on ``R`` ranks sees the same global batches as a run on one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ClassAwareSampler", "ShuffleSampler"]


class _EpochStreamSampler(Sampler[int]):
    """Shared machinery: ranks, epoch, mid-epoch position; subclasses build the global stream of an epoch."""

    def __init__(
        self, size: int, *, num_replicas: int | None, rank: int | None, seed: int, num_samples: int | None
    ) -> None:
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas}): pass 0 <= rank < num_replicas")
        num_samples = size if num_samples is None else num_samples
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} is negative: pass the number of draws per epoch, or None")
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.num_samples = num_samples
        self.epoch = 0
        self.position = 0  # global draws already consumed in this epoch (a multiple of num_replicas)

    @property
    def total_size(self) -> int:
        """Length of the global stream: ``num_samples`` rounded up to a multiple of ``num_replicas``."""
        return math.ceil(self.num_samples / self.num_replicas) * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose stream to draw (reshuffled deterministically from ``(seed, epoch)``) from its
        start."""
        self.epoch = epoch
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        """Plain-int state; ``position`` counts the *global* draws consumed, so it is the same on every rank.

        A :class:`~torch.utils.data.DataLoader` prefetches ahead of what the model has seen, so a trainer should
        overwrite ``position`` with the number of samples it actually consumed (globally) before saving.
        """
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next iteration continues the epoch from ``position``."""
        position = int(state["position"])
        if position % self.num_replicas:
            raise ValueError(
                f"position {position} is not a multiple of num_replicas={self.num_replicas}: resume at a global "
                "batch boundary, or with a number of ranks that divides it"
            )
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.num_samples, self.position = int(state["num_samples"]), position

    def _rng(self, *stream: int) -> np.random.Generator:
        # One generator per list, each shuffling row by row: a longer epoch extends the stream, never reorders it.
        return np.random.default_rng([self.seed, self.epoch, *stream])

    def global_stream(self) -> np.ndarray:
        """The whole epoch's draws, as a single process would make them (``total_size`` dataset indices)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        own = self.global_stream()[self.position + self.rank :: self.num_replicas]
        return iter(own.tolist())

    def __len__(self) -> int:
        return (self.total_size - self.position) // self.num_replicas


class ClassAwareSampler(_EpochStreamSampler):
    """Relay Backpropagation's class-aware sampling, vectorised, sharded and resumable.

    Args:
        labels: The class index of every dataset item (a list, NumPy array or tensor).
        num_replicas: Number of ranks; defaults to the world size of the initialised process group, else 1.
        rank: This process's rank; defaults to the process group's rank, else 0.
        seed: Seed shared by all ranks; with :meth:`set_epoch` it fixes every draw of every epoch.
        num_samples: Draws per epoch (all ranks together); defaults to ``len(labels)``. Rounded up to a multiple of
            ``num_replicas`` by drawing further along the same single-process stream (nothing is duplicated).

    Classes with no item are never drawn. Each rank yields ``ceil(num_samples / num_replicas)`` indices.

    Examples:
        >>> sampler = ClassAwareSampler([0] * 100 + [1], seed=0, num_samples=6)
        >>> [int(i == 100) for i in sampler]  # item 100 is class 1's only image: drawn as often as class 0
        [0, 1, 0, 1, 0, 1]
        >>> # loader = DataLoader(dataset, batch_size=256, sampler=sampler); call sampler.set_epoch(e) each epoch
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).ravel()
        super().__init__(len(labels), num_replicas=num_replicas, rank=rank, seed=seed, num_samples=num_samples)
        if len(labels) == 0 and self.num_samples:
            raise ValueError("labels is empty: class-aware sampling needs at least one labelled item")
        # Group the dataset indices by class once: members[starts[c]:starts[c] + sizes[c]] are class c's items.
        self.members = np.argsort(labels, kind="stable")
        self.classes, self.starts, self.sizes = np.unique(labels[self.members], return_index=True, return_counts=True)

    def global_stream(self) -> np.ndarray:
        total, num_classes = self.total_size, len(self.classes)
        if total == 0:
            return np.empty(0, dtype=np.int64)
        # Level 1: the class list, reshuffled each time it runs out -> consecutive permutations of the classes.
        passes = math.ceil(total / num_classes)
        class_seq = self._rng(0).permuted(np.tile(np.arange(num_classes), (passes, 1)), axis=1).ravel()[:total]
        # The k-th draw of class c (k counted from 0 in stream order) takes item k of c's endless image list.
        order = np.argsort(class_seq, kind="stable")
        draws = np.bincount(class_seq, minlength=num_classes)
        first = np.cumsum(draws) - draws
        k = np.empty(total, dtype=np.int64)
        k[order] = np.arange(total) - np.repeat(first, draws)
        # Level 2: each class's image list, reshuffled each time it runs out. Build, class by class, as many
        # permutations as that class's draws need, laid end to end in one buffer.
        laps = -(-draws // self.sizes)  # ceil(draws / size): permutations needed per class
        offset = np.cumsum(laps * self.sizes) - laps * self.sizes
        lists = np.empty(int((laps * self.sizes).sum()), dtype=np.int64)
        for c in np.flatnonzero(laps):
            items = self.members[self.starts[c] : self.starts[c] + self.sizes[c]]
            laid = self._rng(1, int(self.classes[c])).permuted(np.tile(items, (laps[c], 1)), axis=1).ravel()
            lists[offset[c] : offset[c] + laid.size] = laid
        return lists[offset[class_seq] + k]


class ShuffleSampler(_EpochStreamSampler):
    """Plain uniform shuffling with the same sharding and resume behaviour (the recipe's ``class_aware=False``).

    Args:
        size: Dataset length.
        num_replicas: See :class:`ClassAwareSampler`.
        rank: See :class:`ClassAwareSampler`.
        seed: See :class:`ClassAwareSampler`.
        num_samples: Draws per epoch; defaults to ``size``. Longer epochs chain further permutations.
    """

    def __init__(
        self,
        size: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        super().__init__(size, num_replicas=num_replicas, rank=rank, seed=seed, num_samples=num_samples)
        self.size = size

    def global_stream(self) -> np.ndarray:
        if self.total_size == 0:
            return np.empty(0, dtype=np.int64)
        laps = math.ceil(self.total_size / self.size)
        return self._rng(0).permuted(np.tile(np.arange(self.size), (laps, 1)), axis=1).ravel()[: self.total_size]
