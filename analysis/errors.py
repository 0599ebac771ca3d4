"""The one exception type of the analysis part, a kind of the package's one base error."""

from __future__ import annotations

from se_surgery.errors import SESurgeryError

__all__ = ["AnalysisError"]


class AnalysisError(SESurgeryError):
    """Bad input to the excitation analysis; the message says what is wrong and what to do instead."""
