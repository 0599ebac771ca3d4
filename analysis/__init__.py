"""Excitation analysis of SE networks (SENet Sec. 7.2): capture, per-block metrics, the paper's figures, removal check.

Examples:
    >>> from analysis import capture_excitations, metrics_frame, plot_fig6
    >>> stats = capture_excitations(model, val_loader, per_class=50)  # doctest: +SKIP
    >>> metrics_frame(stats)[["paper_name", "eta2", "saturated_share"]]  # doctest: +SKIP
"""

from analysis.capture import capture_excitations
from analysis.collected import ExcitationStats
from analysis.errors import AnalysisError
from analysis.metrics import block_metrics, metrics_frame
from analysis.plots import plot_fig6, plot_fig7, plot_specificity, save_figure
from analysis.removal import ablate

__all__ = [
    "AnalysisError",
    "ExcitationStats",
    "ablate",
    "block_metrics",
    "capture_excitations",
    "metrics_frame",
    "plot_fig6",
    "plot_fig7",
    "plot_specificity",
    "save_figure",
]
