"""Every exception se-surgery raises: one base, one type per part, each a ``ValueError`` so callers can catch bad
input broadly.

Each message says what is wrong and what to do instead, on one line. The CLIs print such an error as that line and
exit 2 (:func:`se_surgery.cli.run_cli`); :class:`Interrupted` exits 130, as a shell expects of Ctrl-C.
"""

__all__ = ["SESurgeryError", "SurgeryError", "TrainError", "DataError", "CheckpointError", "UntrustedFactory",
           "Interrupted"]


class SESurgeryError(ValueError):
    """The base of every error the package (and :mod:`analysis`) raises on purpose; ``exit_code`` is the CLIs'."""

    exit_code = 2


class SurgeryError(SESurgeryError):
    """A model that cannot be given (or relieved of) SE blocks as asked (:mod:`se_surgery.surgery`)."""


class TrainError(SESurgeryError):
    """A training run that cannot start or go on (:mod:`se_surgery.train`)."""


class DataError(SESurgeryError):
    """A data folder, class folder or image that cannot be used; the message names the path."""


class CheckpointError(SESurgeryError):
    """A checkpoint that is missing, damaged, unsafe or foreign."""


class UntrustedFactory(CheckpointError):
    """A checkpoint or config whose model a factory of someone's code builds, which the user did not name again;
    ``factory`` is its ``package.module:function``, so a command line can say which of its flags names it."""

    def __init__(self, message: str, factory: str) -> None:
        super().__init__(message)
        self.factory = factory


class Interrupted(SESurgeryError):
    """The user stopped the work (Ctrl-C); the message says what was kept and how to go on."""

    exit_code = 130
