"""Every exception se-surgery raises: one type per part, each a ``ValueError`` so callers can catch bad input broadly.

Each message says what is wrong and what to do instead. The CLIs print such an error as one line and exit 2.
"""

__all__ = ["SurgeryError", "TrainError", "DataError", "CheckpointError"]


class SurgeryError(ValueError):
    """A model that cannot be given (or relieved of) SE blocks as asked (:mod:`se_surgery.surgery`)."""


class TrainError(ValueError):
    """A training run that cannot start or go on (:mod:`se_surgery.train`)."""


class DataError(ValueError):
    """A data folder, class folder or image that cannot be used; the message names the path."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, unsafe or foreign."""
