"""One exception type per part of se-surgery, each a ``ValueError`` so callers can catch bad input broadly."""

__all__ = ["SurgeryError"]


class SurgeryError(ValueError):
    """Raised when a model cannot be given (or relieved of) SE blocks; the message says what to do instead."""
