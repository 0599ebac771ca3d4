"""`ExcitationStats`: what :func:`analysis.capture_excitations` returns.

Per SE block (in forward order) one :class:`~analysis.moments.ClassMoments`: per class and channel the number of
images, the mean and the spread of the gate output ``s``, plus a histogram of ``s`` over [0, 1] per class. Blocks are
named by their SE module (``"layer4.1.se"``); the paper's names (``"SE_5_2"``) are accepted wherever they exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.moments import ClassMoments
from se_surgery.surgery.naming import resolve_blocks

__all__ = ["ALL", "ExcitationStats", "resolve_classes", "select_blocks"]

ALL = "all"
"""The ``class`` value of the rows pooled over every captured class (the paper's "all" curve)."""


def select_blocks(blocks: Iterable[str], paper_names: Mapping[str, str], names: Iterable[str] | None) -> list[str]:
    """Resolve ``names`` (SE module names or paper names; ``None`` = all) to SE module names among ``blocks``.

    Raises:
        AnalysisError: a name that is no SE block; the message lists the valid ones.
    """
    blocks = list(blocks)
    if names is None:
        return blocks
    chosen, unknown = resolve_blocks(names, blocks, paper_names)
    if unknown:
        valid = ", ".join(paper_names.get(b, b) for b in blocks)
        raise AnalysisError(f"unknown SE block(s) {', '.join(unknown)}: use any of {valid}")
    return chosen


def resolve_classes(
    classes: Sequence[int | str] | None, names: Sequence[str] | None, aliases: Sequence[str] | None = None,
    *, once: bool = False,
) -> list[int] | None:
    """Class indices from class names, indices, or indices written as text (``None`` = all, returned as ``None``).

    Args:
        classes: What the user asked for.
        names: The dataset's class names (index order), or ``None`` when it has none (then only indices work).
        aliases: Other names of the same classes, tried after ``names`` (ImageNet's words for its folder ids).
        once: refuse a class asked for twice (by the same name or index, or by its name and its index), for a
            caller that reads a class's images once per mention and would count them twice.

    Raises:
        AnalysisError: an unknown name or an index out of range (the message lists the valid ones), or with ``once``
            a class asked for twice.
    """
    if classes is None:
        return None
    out = []
    for cls in classes:
        if isinstance(cls, str) and names is not None and cls in names:
            out.append(list(names).index(cls))
        elif isinstance(cls, str) and aliases is not None and cls in aliases:
            out.append(list(aliases).index(cls))
        elif (isinstance(cls, (int, np.integer, str)) and str(cls).isdigit()
              and (names is None or int(cls) < len(names))):
            out.append(int(cls))
        else:
            known = list(names or aliases or [])
            valid = ", ".join(known[:30]) + (f", ... ({len(known)} in all)" if len(known) > 30 else "")
            raise AnalysisError(f"unknown class {cls!r}: use any of {valid or 'the class indices'} (or their indices)")
    seen: dict[int, int | str] = {}
    for cls, k in zip(classes, out):
        if once and k in seen:
            label = names[k] if names is not None else str(k)
            raise AnalysisError(f"class {label!r} is asked for twice (as {seen[k]!r} and {cls!r}): list each class "
                                "once")
        seen[k] = cls
    return out


@dataclass
class ExcitationStats:
    """Streaming excitation statistics of every captured SE block.

    Attributes:
        moments: SE module name -> its per-class moments, in forward order.
        class_names: Name of each class index (the dataset's ``classes``, else the index as text).
        paper_names: SE module name -> paper name (``SE_<stage>_<block>``) where the model has one.
        unbounded: Blocks whose gate is not a sigmoid in [0, 1] (``add_se(excitation="tanh" | "relu")``): their
            saturation metrics are undefined, and their histograms clip to [0, 1].
    """

    moments: dict[str, ClassMoments]
    class_names: list[str]
    paper_names: dict[str, str] = field(default_factory=dict)
    unbounded: set[str] = field(default_factory=set)

    @property
    def blocks(self) -> list[str]:
        """SE module names in forward order."""
        return list(self.moments)

    @property
    def classes(self) -> list[int]:
        """Indices of the classes that have at least one captured image."""
        first = next(iter(self.moments.values()))
        return [int(k) for k in np.flatnonzero(first.n.cpu().numpy() > 0)]

    def block(self, name: str) -> str:
        """The SE module name of ``name`` (an SE module name or a paper name).

        Raises:
            AnalysisError: ``name`` is neither; the message lists the valid names.
        """
        return name if name in self.moments else select_blocks(self.moments, self.paper_names, [name])[0]

    def paper_name(self, block: str) -> str:
        """The paper's name of a block, or its module name where it has none."""
        block = self.block(block)
        return self.paper_names.get(block, block)

    def depth(self, block: str) -> int:
        """1-based position of the block in forward order."""
        return self.blocks.index(self.block(block)) + 1

    def class_index(self, cls: int | str) -> int:
        """The index of ``cls`` (an index or a class name).

        Raises:
            AnalysisError: no such class; the message lists the valid names.
        """
        return resolve_classes([cls], self.class_names)[0]

    def moments_of(self, block: str, cls: int | str | None = None) -> tuple[float, np.ndarray, np.ndarray]:
        """Count, mean ``(C,)`` and M2 ``(C,)`` (sum of squared deviations) of class ``cls`` (``None``: all pooled)."""
        m = self.moments[self.block(block)]
        if cls is None or cls == ALL:
            n, mean, m2 = m.pooled()
        else:
            k = self.class_index(cls)
            n, mean, m2 = float(m.n[k]), m.mean[k], m.m2[k]
        return n, mean.cpu().numpy(), m2.cpu().numpy()

    def count(self, block: str, cls: int | str | None = None) -> int:
        """Images captured at ``block`` for class ``cls`` (``None``: all classes)."""
        return int(self.moments_of(block, cls)[0])

    def mean(self, block: str, cls: int | str | None = None) -> np.ndarray:
        """Mean excitation per channel, shape ``(C,)``, for class ``cls`` (``None``: all classes pooled)."""
        return self.moments_of(block, cls)[1]

    def std(self, block: str, cls: int | str | None = None) -> np.ndarray:
        """Sample standard deviation (``ddof=1``) per channel; NaN with fewer than two images."""
        n, _, m2 = self.moments_of(block, cls)
        return np.sqrt(m2 / (n - 1)) if n > 1 else np.full_like(m2, np.nan)

    def histogram(self, block: str, cls: int | str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Counts of excitation values (all channels) in equal bins over [0, 1], and the bin edges."""
        m = self.moments[self.block(block)]
        hist = m.hist.sum(0) if cls is None or cls == ALL else m.hist[self.class_index(cls)]
        return hist.cpu().numpy(), np.linspace(0.0, 1.0, m.bins + 1)

    def to_frame(self, blocks: Sequence[str] | None = None) -> pd.DataFrame:
        """Tidy table: one row per block, class (and ``"all"``), channel.

        Columns: ``block, paper_name, depth, class, channel, n, mean, std``.
        """
        frames = []
        for block in blocks or self.blocks:
            block = self.block(block)
            for cls in [*(self.class_names[k] for k in self.classes), ALL]:
                mean = self.mean(block, cls)
                frames.append(
                    pd.DataFrame(
                        {
                            "block": block,
                            "paper_name": self.paper_name(block),
                            "depth": self.depth(block),
                            "class": cls,
                            "channel": np.arange(mean.size),
                            "n": self.count(block, cls),
                            "mean": mean,
                            "std": self.std(block, cls),
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True)

    def merge(self, other: ExcitationStats) -> ExcitationStats:
        """Fold ``other`` (captured from the same model on other images) into this one; returns ``self``."""
        if other.blocks != self.blocks:
            raise AnalysisError(
                f"cannot merge statistics of blocks {other.blocks} into {self.blocks}: capture both from the same "
                "model with the same blocks"
            )
        for block, m in self.moments.items():
            m.merge(other.moments[block])
        self.unbounded |= other.unbounded
        if len(other.class_names) > len(self.class_names):
            self.class_names = list(other.class_names)
        return self

    def all_reduce(self) -> ExcitationStats:
        """Pool the statistics of all ranks (no-op outside ``torch.distributed``); returns ``self``."""
        for m in self.moments.values():
            m.all_reduce()
        n = max(m.num_classes for m in self.moments.values())
        self.class_names += [str(k) for k in range(len(self.class_names), n)]
        return self
