"""Streaming per-class moments and histograms of a vector-valued signal.

One :class:`ClassMoments` holds, for every class ``k`` and channel ``c``, the count ``n_k``, the mean and the sum of
squared deviations ``M2`` (Welford / Chan et al.), plus a fixed-bin histogram over [0, 1] per class. Its memory is
``O(classes x channels)``, whatever the number of images. Batches are folded in with Chan's pairwise update, which is
the same formula that merges two accumulators, so splitting the data (batches, ranks) does not change the result beyond
float64 rounding.

Reference: T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating formulae and a pairwise algorithm for computing sample
variances", 1979.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["ClassMoments"]


def _pad_rows(t: torch.Tensor, extra: int) -> torch.Tensor:
    """``t`` with ``extra`` zero rows appended along dim 0."""
    return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]) if extra > 0 else t


class ClassMoments:
    """Per-class count, mean, M2 and histogram of ``(N, C)`` samples, in float64.

    Args:
        num_classes: Number of class rows to start with; grows when a larger label shows up.
        channels: Number of channels ``C`` of each sample.
        bins: Number of equal-width histogram bins over [0, 1]; values outside are put in the end bins.
        device: Where the accumulators live (the capture device, so updates need no host copies).
    """

    def __init__(self, num_classes: int, channels: int, *, bins: int = 20, device: torch.device | str = "cpu") -> None:
        self.channels = channels
        self.bins = bins
        self.n = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.mean = torch.zeros(num_classes, channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(num_classes, channels, dtype=torch.float64, device=device)
        self.hist = torch.zeros(num_classes, bins, dtype=torch.int64, device=device)

    @property
    def num_classes(self) -> int:
        return self.n.numel()

    def grow(self, num_classes: int) -> None:
        """Add empty class rows so that there are at least ``num_classes``."""
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        self.n, self.mean, self.m2, self.hist = (_pad_rows(t, extra) for t in (self.n, self.mean, self.m2, self.hist))

    def update(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold in a batch.

        Args:
            values: ``(N, C)`` samples (any float dtype; accumulated in float64).
            labels: ``(N,)`` integer class of each sample.
        """
        values = values.to(self.mean.device, torch.float64)
        labels = labels.to(self.mean.device, torch.long)
        self.grow(int(labels.max()) + 1)
        k = self.num_classes
        n_b = torch.bincount(labels, minlength=k).to(torch.float64)
        sums = torch.zeros_like(self.mean).index_add_(0, labels, values)
        mean_b = sums / n_b.clamp(min=1).unsqueeze(1)
        m2_b = torch.zeros_like(self.m2).index_add_(0, labels, (values - mean_b[labels]).square())
        self._combine(n_b, mean_b, m2_b)
        idx = (values * self.bins).long().clamp_(0, self.bins - 1) + labels.unsqueeze(1) * self.bins
        self.hist += torch.bincount(idx.flatten(), minlength=k * self.bins).view(k, self.bins)

    def merge(self, other: ClassMoments) -> ClassMoments:
        """Fold another accumulator (same channels and bins) into this one; returns ``self``."""
        if (other.channels, other.bins) != (self.channels, self.bins):
            raise ValueError(
                f"cannot merge moments of {other.channels} channels / {other.bins} bins into {self.channels} / "
                f"{self.bins}: merge statistics captured from the same model with the same bins"
            )
        self.grow(other.num_classes)
        pad = self.num_classes - other.num_classes
        n_b, mean_b, m2_b, hist_b = (
            _pad_rows(t.to(self.mean.device), pad) for t in (other.n, other.mean, other.m2, other.hist)
        )
        self._combine(n_b, mean_b, m2_b)
        self.hist += hist_b
        return self

    def _combine(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan's update: (n_a, mean_a, M2_a) + (n_b, mean_b, M2_b) -> pooled, row by row."""
        n = self.n + n_b
        w_b = (n_b / n.clamp(min=1)).unsqueeze(1)  # 0 where the batch has no sample of the class
        delta = mean_b - self.mean
        self.mean += delta * w_b
        self.m2 += m2_b + delta.square() * (self.n.unsqueeze(1) * w_b)
        self.n = n

    def all_reduce(self) -> None:
        """Pool the accumulators of every rank in place (a no-op unless ``torch.distributed`` is initialised).

        The ranks first agree on the number of classes, then gather each other's moments and fold them in rank
        order, so every rank ends with the same pooled statistics.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        k = torch.tensor([self.num_classes], device=self.n.device)
        dist.all_reduce(k, op=dist.ReduceOp.MAX)
        self.grow(int(k))
        gathered = []
        for t in (self.n, self.mean, self.m2):
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, t)
            gathered.append(parts)
        hist = self.hist.clone()
        dist.all_reduce(hist)
        pooled = ClassMoments(self.num_classes, self.channels, bins=self.bins, device=self.n.device)
        for n_r, mean_r, m2_r in zip(*gathered):
            pooled._combine(n_r, mean_r, m2_r)
        self.n, self.mean, self.m2, self.hist = pooled.n, pooled.mean, pooled.m2, hist

    def std(self) -> torch.Tensor:
        """Sample standard deviation per class and channel (``ddof=1``, as ``torch.std``); NaN where ``n < 2``."""
        var = self.m2 / (self.n - 1).unsqueeze(1)
        return torch.where((self.n > 1).unsqueeze(1), var, torch.full_like(var, float("nan"))).sqrt()

    def pooled(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Count, mean and M2 of all classes together (the between-class part added to M2)."""
        n = self.n.sum()
        w = (self.n / n.clamp(min=1)).unsqueeze(1)
        mean = (self.mean * w).sum(0)
        m2 = self.m2.sum(0) + (self.n.unsqueeze(1) * (self.mean - mean).square()).sum(0)
        return float(n), mean, m2

    def to(self, device: torch.device | str) -> ClassMoments:
        """Move the accumulators to ``device`` in place; returns ``self``."""
        self.n, self.mean, self.m2, self.hist = (t.to(device) for t in (self.n, self.mean, self.m2, self.hist))
        return self
