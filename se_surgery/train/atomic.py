"""Atomic file writes: a reader, or a crash at any moment, sees the old file or the new one, never half of it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable

__all__ = ["TMP", "replace_atomically", "sync_folder"]

TMP = ".tmp-"
"""The temporary file of a write in progress is ``.<name>.tmp-<pid>`` beside its target."""


def replace_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write(f)`` into a temporary file beside ``path``, flushed and fsynced, then ``os.replace`` it onto ``path``.

    On any failure (a full disk, Ctrl-C) the temporary file is removed, ``path`` keeps what it held and the error
    propagates. Call :func:`sync_folder` after it so that the rename itself survives a power cut.
    """
    tmp = path.with_name(f".{path.name}{TMP}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sync_folder(folder: Path) -> None:
    """fsync ``folder``, so that a rename into it is on disk."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
