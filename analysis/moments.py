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

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["ClassMoments", "LabelBatch", "work_dtype"]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a batch's own sums are taken in: float64 for float64 values, float32 for every other."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LabelBatch:
    """A batch's labels in the forms :meth:`ClassMoments.fold` needs, made once for every block that saw the batch.

    Only the classes present in the batch are summed (their count bounded by the batch, not by the 1000 of
    ImageNet). Up to :attr:`MATMUL_CLASSES` of them, the class sums are one-hot matrix products in the work dtype
    (BLAS accumulates them in blocks, so float32 sums of thousands of samples stay within 1e-7); beyond, they are
    scatters (``index_add_``) in float64.

    Args:
        labels: ``(N,)`` integer class of each sample.
        bins: Histogram bins of the moments it will be folded into.
        dtype: The values' work dtype (:func:`work_dtype`).
        device: Where the accumulators live.
    """

    MATMUL_CLASSES = 64

    def __init__(self, labels: torch.Tensor, bins: int, dtype: torch.dtype, device: torch.device | str) -> None:
        labels = labels.to(device, torch.long)
        self.device, self.bins = labels.device, bins
        self.present, self.column = labels.unique(return_inverse=True)  # the batch's classes (sorted); each sample's
        k = len(self.present)
        if k and int(self.present[0]) < 0:
            raise ValueError(f"labels must be class indices >= 0, got {int(self.present[0])}")
        self.num_classes = int(self.present[-1]) + 1 if k else 0
        matmul = 0 < k <= self.MATMUL_CLASSES
        self.dtype = dtype if matmul else torch.float64
        self.onehot = F.one_hot(self.column, k).to(self.dtype) if matmul else None  # N x K'
        self.onehot_t = self.onehot.t().contiguous() if self.onehot is not None else None
        self.n = torch.bincount(self.column, minlength=k).to(torch.float64)
        self.count = self.n.to(self.dtype).unsqueeze(1)  # >= 1: only present classes are summed
        self.offsets = (self.column.to(torch.int32) * bins).unsqueeze(1)  # each sample's first histogram bin

    def scattered(self) -> LabelBatch:
        """The same labels summed by scatters in float64: a NaN or infinity then stays in its own class (a one-hot
        product multiplies it by the other classes' zeros, which gives NaN)."""
        if self.onehot is None:
            return self
        other = copy.copy(self)
        other.dtype, other.onehot, other.onehot_t = torch.float64, None, None
        other.count = self.n.unsqueeze(1)
        return other

    def class_sums(self, values: torch.Tensor) -> torch.Tensor:
        """K' x C: the sum of ``values`` (N x C, in :attr:`dtype`) over the samples of each present class."""
        if self.onehot_t is not None:
            return self.onehot_t.mm(values)
        return values.new_zeros(len(self.present), values.shape[1]).index_add_(0, self.column, values)

    def less_class_means(self, values: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """``values`` less the mean (row of ``means``, K' x C) of each sample's class."""
        if self.onehot is not None:
            return torch.addmm(values, self.onehot, means, alpha=-1)
        return values - means.index_select(0, self.column)


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

        The batch's own count, mean and M2 per class are computed in the values' dtype (float64 stays float64;
        float32, bfloat16 and half in float32) with one-hot matrix products (scatters in float64 when the batch holds
        more than :attr:`LabelBatch.MATMUL_CLASSES` classes, or a non-finite value) and the corrected two-pass formula
        (Chan et al.'s eq. 1.7: the centred sum removes the first-order error of the batch mean), then merged into
        the float64 accumulators. The histogram bins the values as they are.

        Args:
            values: ``(N, C)`` samples (any float dtype).
            labels: ``(N,)`` integer class of each sample.
        """
        self.fold(values, LabelBatch(labels, self.bins, work_dtype(values.dtype), self.mean.device))

    def fold(self, values: torch.Tensor, batch: LabelBatch) -> None:
        """:meth:`update` with the labels already prepared (shared by every block that saw the same images)."""
        if batch.bins != self.bins:
            raise ValueError(f"labels prepared for {batch.bins} histogram bins, not this accumulator's {self.bins}")
        rows = batch.present
        if not len(rows):
            return
        values = values.to(batch.device, batch.dtype)
        self.grow(batch.num_classes)
        mean_b = batch.class_sums(values) / batch.count
        if batch.onehot is not None and not bool(torch.isfinite(mean_b).all()):  # a non-finite value: keep it in
            return self.fold(values, batch.scattered())  # its class
        centred = batch.less_class_means(values, mean_b)
        residual = batch.class_sums(centred).double()  # the centred sum: 0 up to the rounding of mean_b
        count = batch.count.double()
        m2_b = (batch.class_sums(centred.square_()).double() - residual.square() / count).clamp_(min=0)
        every = len(rows) == self.num_classes  # rows are sorted and distinct: then they are every class, in order
        self._combine(batch.n, mean_b.double() + residual / count, m2_b, None if every else rows)
        scaled = torch.mul(values, self.bins, out=centred).clamp_(0, self.bins - 1)  # centred's memory, reused
        bins = scaled.to(torch.int32).clamp_(0, self.bins - 1)  # a NaN (an int's minimum) to bin 0
        bins += batch.offsets
        hist = torch.bincount(bins.flatten(), minlength=len(rows) * self.bins).view(len(rows), self.bins)
        if every:
            self.hist += hist
        else:
            self.hist.index_add_(0, rows, hist)

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

    def _combine(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor,
                 rows: torch.Tensor | None = None) -> None:
        """Chan's update: (n_a, mean_a, M2_a) + (n_b, mean_b, M2_b) -> pooled, row by row (the class ``rows`` of
        the accumulators, when given; every row otherwise)."""
        n_a, mean_a = (self.n, self.mean) if rows is None else (self.n[rows], self.mean[rows])
        n = n_a + n_b
        w_b = (n_b / n.clamp(min=1)).unsqueeze(1)  # 0 where the batch has no sample of the class
        delta = mean_b - mean_a
        mean = mean_a + delta * w_b
        m2 = m2_b + delta.square() * (n_a.unsqueeze(1) * w_b)
        if rows is None:
            self.mean, self.n = mean, n
            self.m2 += m2
        else:
            self.mean[rows], self.n[rows] = mean, n
            self.m2.index_add_(0, rows, m2)

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
