"""The paper's excitation figures (SENet Fig. 6 and Fig. 7) and class-specificity / saturation against depth.

Every function returns a matplotlib ``Figure`` drawn in seaborn's "paper" context, sized for a two-column page
(7 inches wide); :func:`save_figure` writes it as PNG and PDF in the same style.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.collected import ALL, ExcitationStats
from analysis.protocol import paper_blocks

__all__ = ["fig6_blocks", "plot_fig6", "plot_fig7", "plot_specificity", "save_figure"]

MAX_CLASS_LINES = 8
"""Fig. 6 draws at most this many class curves (the paper draws four); beyond, the first four chosen classes."""


@contextmanager
def _style() -> Iterator[None]:
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.0), plt.rc_context(
        {"savefig.bbox": "tight", "figure.dpi": 100}
    ):
        yield


def fig6_blocks(stats: ExcitationStats) -> list[str]:
    """The blocks to show: the paper's choice (:func:`analysis.protocol.paper_blocks`: the last block of every stage
    but the final one plus every block of the final stage, the paper's six on SE-ResNet-50). Without paper names, up
    to six blocks evenly spread over depth, the last included."""
    chosen = paper_blocks(stats.blocks, stats.paper_names)
    if chosen:
        return chosen
    idx = np.unique(np.linspace(0, len(stats.blocks) - 1, min(6, len(stats.blocks))).round().astype(int))
    return [stats.blocks[i] for i in idx]


def _channels(stats: ExcitationStats, block: str, first: int, sampled: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """The channel indices drawn for ``block``: its sampled ones if given, else ``0 .. first-1``."""
    if sampled is not None and stats.block(block) in sampled:
        return np.asarray(sampled[stats.block(block)])
    return np.arange(min(first, stats.mean(block).size))


def _panels(n: int, height: float = 2.0) -> tuple[plt.Figure, np.ndarray]:
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.0, height * rows + 0.6), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat[:n]


def _finish(fig: plt.Figure, axes: np.ndarray, ylabel: str, *, legend_title: str | None = None) -> None:
    """Label the first panel of each row, put one legend (of the first panel's curves) under the grid."""
    for ax in axes[:: min(3, len(axes))]:
        ax.set_ylabel(ylabel)
    handles, names = axes[0].get_legend_handles_labels()
    ncol = min(len(names), 6)
    fig.legend(handles, names, loc="lower center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, -0.02),
               title=legend_title)
    legend_rows = -(-len(names) // ncol) + (legend_title is not None)
    fig.tight_layout(rect=(0, 0.01 + 0.035 * legend_rows, 1, 1))


def _class_labels(stats: ExcitationStats, classes: Sequence[int | str] | None, limit: int) -> list[str]:
    chosen = [stats.class_names[stats.class_index(c)] for c in classes] if classes else [
        stats.class_names[k] for k in stats.classes
    ]
    return chosen if len(chosen) <= limit else chosen[: min(4, limit)]


def plot_fig6(
    stats: ExcitationStats,
    *,
    classes: Sequence[int | str] | None = None,
    blocks: Sequence[str] | None = None,
    channels: int = 50,
    sampled: Mapping[str, np.ndarray] | None = None,
) -> plt.Figure:
    """Fig. 6: mean excitation against channel index, one curve per class plus the all-class mean, one panel per block.

    Args:
        stats: Captured statistics.
        classes: Classes to draw (default: every captured class, or the first four when there are more than eight).
        blocks: Blocks to draw (default: :func:`fig6_blocks`).
        channels: Draw channels ``0 .. channels-1`` where ``sampled`` has none for a block.
        sampled: SE module name -> channel indices to draw (the paper's 50 uniformly sampled channels,
            :func:`analysis.protocol.sample_channels`).
    """
    labels = _class_labels(stats, classes, MAX_CLASS_LINES)
    blocks = list(blocks or fig6_blocks(stats))
    with _style():
        fig, axes = _panels(len(blocks))
        palette = sns.color_palette("tab10" if len(labels) <= 10 else "husl", len(labels))
        for ax, block in zip(axes, blocks):
            idx = _channels(stats, block, channels, sampled)
            for color, cls in zip(palette, labels):
                ax.plot(idx, stats.mean(block, cls)[idx], color=color, lw=1.0, label=cls)
            ax.plot(idx, stats.mean(block)[idx], color="black", lw=1.6, ls="--", label=f"{ALL} classes")
            ax.set(title=stats.paper_name(block), xlabel="channel index", ylim=(-0.02, 1.05))
        _finish(fig, axes, "mean excitation", legend_title="class")
    return fig


def plot_fig7(
    stats: ExcitationStats,
    *,
    classes: Sequence[int | str] | None = None,
    blocks: Sequence[str] | None = None,
    channels: int = 50,
    sampled: Mapping[str, np.ndarray] | None = None,
) -> plt.Figure:
    """Fig. 7: mean excitation +/- one standard deviation across images, per channel, for one or two classes.

    Args:
        stats: Captured statistics.
        classes: One or two classes (default: the first two captured).
        blocks: Blocks to draw (default: :func:`fig6_blocks`).
        channels: Draw channels ``0 .. channels-1`` (hundreds of channels with bands are unreadable at paper size)
            where ``sampled`` has none for a block.
        sampled: SE module name -> channel indices to draw (as for :func:`plot_fig6`).
    """
    labels = _class_labels(stats, classes, 2)[:2]
    blocks = list(blocks or fig6_blocks(stats))
    with _style():
        fig, axes = _panels(len(blocks))
        for ax, block in zip(axes, blocks):
            for color, cls in zip(sns.color_palette("deep", 2), labels):
                x = _channels(stats, block, channels, sampled)
                mean, std = stats.mean(block, cls)[x], np.nan_to_num(stats.std(block, cls)[x])
                ax.plot(x, mean, color=color, lw=1.0, label=f"class {cls} (n={stats.count(block, cls)})")
                ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=color, alpha=0.25, lw=0)
            ax.set(title=stats.paper_name(block), xlabel="channel index", ylim=(-0.02, 1.05),
                   xlim=(x[0], max(x[-1], x[0] + 1)))
        _finish(fig, axes, "excitation (mean ± std)")
    return fig


def plot_specificity(metrics: pd.DataFrame) -> plt.Figure:
    """Class-specificity (eta squared, Jensen-Shannon distance, the class-to-all gap in units of s) and saturation
    against depth, every block.

    Args:
        metrics: :func:`analysis.metrics.metrics_frame` output.
    """
    metrics = metrics.sort_values("depth")
    specificity = {
        "eta² (variance between classes)": metrics["eta2"],
        "Jensen-Shannon distance (mean over class pairs)": metrics["js_mean"],
        "mean gap |class - all| curves (units of s)": metrics["gap"],
    }
    saturation = {
        "share of channels with mean s > 0.9": metrics["saturated_share"],
        "mean of 1 - s": metrics["one_minus_s"],
    }
    with _style():
        fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.4), sharex=True)
        for ax, series, title in zip(axes, (specificity, saturation), ("class-specificity", "saturation")):
            for (label, values), marker in zip(series.items(), "os^"):
                ax.plot(metrics["depth"], values, marker=marker, ms=4, lw=1.2, label=label)
            ax.set(title=title, xlabel="SE block (forward order)", ylim=(-0.02, 1.02))
            ax.set_xticks(metrics["depth"], metrics["paper_name"], rotation=60, ha="right")
            ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.1), frameon=False, fontsize="small")
        axes[0].set_ylabel("value (0 to 1)")
        fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, out_dir: str | Path, stem: str, *, dpi: int = 200) -> list[Path]:
    """Write ``<out_dir>/<stem>.png`` and ``.pdf`` and close the figure; returns both paths."""
    paths = [Path(out_dir) / f"{stem}.{ext}" for ext in ("png", "pdf")]
    with _style():
        for path in paths:
            fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return paths
