"""The one way every command line of the project ends on an error: one line on stderr, no traceback.

``python -m se_surgery.train``, ``python -m se_surgery.describe``, ``python -m se_surgery.export``,
``python -m analysis.excitations`` and ``python -m analysis.ablations`` all run their ``main`` through :func:`run_cli`:

- an :class:`~se_surgery.errors.SESurgeryError` (what is wrong + what to do) -> ``PROG: error: ...``, exit 2
  (:class:`~se_surgery.errors.Interrupted`: exit 130);
- Ctrl-C anywhere else -> ``PROG: interrupted``, exit 130;
- an ``OSError`` from the file system (a read-only or full disk, a path that is a file) -> the path and the reason,
  exit 2.

Their parsers are :class:`ArgumentParser`, so a flag argparse itself refuses (``--epochs abc``) is one line too.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .errors import Interrupted, SESurgeryError

__all__ = ["ArgumentParser", "run_cli", "one_line", "os_advice"]

# What to do about a file-system error, by errno: (for any path, for a folder that must stay, a run's own).
_OS_ADVICE: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("free some disk space (or pick another --out)", "free some disk space"),
    errno.EDQUOT: ("free some disk quota (or pick another --out)", "free some disk quota"),
    errno.EACCES: ("pick a folder you can write to, or fix its permissions", "make {folder} writable again"),
    errno.EPERM: ("pick a folder you can write to, or fix its permissions", "make {folder} writable again"),
    errno.EROFS: ("pick a folder on a writable file system (this one is read-only)",
                  "make {folder} writable again (its file system is read-only)"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder: pick another path",) * 2,
    errno.EEXIST: ("the path exists and is not a folder: pick another path",) * 2,
    errno.EISDIR: ("the path is a folder, not a file: name the file inside it",) * 2,
    errno.ENOENT: ("check the path",) * 2,
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line usage errors: ``PROG: error: MESSAGE (see PROG --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(error: BaseException) -> str:
    """The error's message with its white space folded onto one line."""
    return " ".join(str(error).split()) or type(error).__name__


def os_advice(error: OSError, *, folder: str | os.PathLike | None = None) -> str:
    """What to do about the file-system ``error`` (a full disk, no permission, ...), as one phrase for a message.

    ``folder``: the folder the work must stay in (a run folder that a resume continues), so the advice is to repair
    it rather than to pick another one.

    Examples:
        >>> os_advice(OSError(errno.ENOSPC, "No space left on device"))
        'free some disk space (or pick another --out)'
        >>> os_advice(OSError(errno.EACCES, "Permission denied"), folder="runs/demo")
        'make runs/demo writable again'
    """
    anywhere, here = _OS_ADVICE.get(error.errno, ("check the path and the disk",) * 2)
    return anywhere if folder is None else here.format(folder=folder)


def _describe_os_error(error: OSError) -> str:
    where = f" {error.filename}" if error.filename else ""
    return f"cannot use{where} ({error.strerror or error}): {os_advice(error)}"


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, *,
            prog: str) -> int:
    """Run a CLI's ``main(argv)`` and turn what it raises into one line and an exit code (0 when it returns None)."""
    try:
        return int(main(argv) or 0)
    except SESurgeryError as error:
        prefix = "" if isinstance(error, Interrupted) else "error: "
        print(f"{prog}: {prefix}{one_line(error)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        print(f"{prog}: error: {_describe_os_error(error)}", file=sys.stderr)
        return 2
