"""Excitation analysis of SE networks: capture, per-block metrics, the paper's figures, and the removal check."""

from analysis.capture import capture_excitations
from analysis.errors import AnalysisError
from analysis.excitation_stats import ExcitationStats

__all__ = ["AnalysisError", "ExcitationStats", "capture_excitations"]
