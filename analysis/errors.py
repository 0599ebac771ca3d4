"""The one exception type of the analysis part."""

from __future__ import annotations

__all__ = ["AnalysisError"]


class AnalysisError(ValueError):
    """Bad input to the excitation analysis; the message says what is wrong and what to do instead."""
