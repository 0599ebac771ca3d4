"""One trainer per run folder: rank 0 holds ``<out>/train.lock`` (host, pid, start time) while it trains.

The lock file appears with its content in one step (written aside, then hard-linked into place, which fails if a
lock is already there), so a reader never sees half of it. It counts as stale only when it names this host and a
process that is gone (dead, a zombie, or its pid now taken by a younger process); then it is replaced, with a note.
A lock of another host is never taken over: this machine cannot tell whether that trainer still runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from ..cli import os_advice
from ..errors import TrainError
from .distributed import Env, all_sum

__all__ = ["LOCK_NAME", "RunLock", "check_out", "refuse_if_held"]

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
_HELD: set[Path] = set()  # run folders this process holds (so its own lock is not "another trainer")


def _process_start(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks since boot)`` of ``pid`` from ``/proc``, or ``None`` where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
    return fields[0], int(fields[19])


def _alive(pid: int, started: int | None) -> bool:
    """Whether the process the lock names still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    proc = _process_start(pid)
    if proc is None:
        return True  # no /proc: trust the pid
    state, ticks = proc
    return state not in ("Z", "X") and (started is None or ticks == started)


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's holder, ``{}`` for an unreadable lock, ``None`` when there is no lock."""
    try:
        holder = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():  # this pid, but not a folder this process holds: an earlier life of the pid
        return True
    return not _alive(holder["pid"], holder.get("pid_start"))


def _held_message(out: Path, holder: dict[str, Any]) -> str:
    lock = out / LOCK_NAME
    if not holder:
        return (f"{out} is locked by {lock}, which cannot be read: another trainer may be starting there; wait, or "
                f"pass another --out (delete {lock} only if no trainer uses {out})")
    pid, host, since = holder.get("pid"), holder.get("host"), holder.get("started", "an unknown time")
    if host == socket.gethostname():
        return (f"{out} is in use by another trainer (pid {pid} on this host {host}, since {since}): wait for it to "
                f"finish or stop it (kill {pid}), or pass another --out")
    return (f"{out} is in use by another trainer (pid {pid} on host {host}, since {since}); this host cannot tell "
            f"whether it still runs: wait for it or pass another --out, or, if it is gone, delete {lock}")


def refuse_if_held(out: str | os.PathLike) -> None:
    """Raise :class:`TrainError` naming the holder if a live trainer (not this process) holds the run folder ``out``.

    A look only, for the checks made before :class:`RunLock` is taken (e.g. which checkpoint ``--resume`` means).
    """
    out = Path(out)
    if out.absolute() in _HELD:
        return
    holder = _read(out / LOCK_NAME)
    if holder is not None and not _stale(holder):
        raise TrainError(_held_message(out, holder))


def check_out(out: Path) -> None:
    """Refuse, in one line naming the path and the fix, an ``out`` that cannot be a run folder."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder: pass another --out (a new or existing folder)")
    file = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if file is not None:
        raise TrainError(f"--out {out} lies inside {file}, which is a file: pass an --out inside a folder")
    writable = next((p for p in (out, *out.parents) if p.exists()), None)
    if writable is not None and not os.access(writable, os.W_OK | os.X_OK):
        raise TrainError(f"--out {out}: {writable} is not writable: pick a folder you can write to, or fix its "
                         "permissions")


def _os_message(out: Path, error: OSError) -> str:
    return f"cannot write to --out {out} ({error.strerror or error}): {os_advice(error)}"


class RunLock:
    """Hold the run folder ``out`` for this run: rank 0 takes the lock, every rank learns whether it did.

    Use it as a context manager around the whole run; it is released on any exit (an error, Ctrl-C). A folder
    that ``__enter__`` created and that is left empty is removed again.

    Raises:
        TrainError: ``out`` cannot be a writable folder, or another trainer holds it (the message names it).
    """

    def __init__(self, out: str | os.PathLike, env: Env | None = None) -> None:
        self.out = Path(out)
        self.env = env or Env()
        self.path = self.out / LOCK_NAME
        self._created = False
        self._held = False

    def __enter__(self) -> RunLock:
        error = None
        if self.env.is_main:
            try:
                self.acquire()
            except TrainError as e:
                error = e
        if all_sum(torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64), self.env).item():
            self.release()
            if error is not None:
                raise error
            raise TrainError(f"rank 0 could not take the run folder {self.out}: see its message")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Create ``out`` if needed and the lock file in it, replacing a stale lock of this host."""
        check_out(self.out)
        if self.out.absolute() in _HELD:
            raise TrainError(f"{self.out} is in use by another run of this process (pid {os.getpid()}): wait for it "
                             "to finish, or pass another --out")
        try:
            if not self.out.exists():
                self.out.mkdir(parents=True)
                self._created = True
            proc = _process_start(os.getpid())
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": proc and proc[1],
                      "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            new = self.out / f".{LOCK_NAME}.new-{os.getpid()}"
            new.write_text(json.dumps(holder) + "\n")
            try:
                for _ in range(3):  # a stale lock, taken over, may be replaced by a racer's: look again
                    if self._link(new):
                        self._held = True
                        _HELD.add(self.out.absolute())
                        break
                    current = _read(self.path)
                    if current is not None and not _stale(current):
                        raise TrainError(_held_message(self.out, current))
                    self._remove_stale(current)
                else:
                    raise TrainError(_held_message(self.out, _read(self.path) or {}))
            finally:
                new.unlink(missing_ok=True)
        except OSError as e:
            self.release()
            raise TrainError(_os_message(self.out, e)) from None
        except BaseException:  # a refusal, Ctrl-C: leave nothing behind
            self.release()
            raise

    def _link(self, new: Path) -> bool:
        """Put ``new`` in place as the lock if there is none; ``False`` if there is one."""
        try:
            os.link(new, self.path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # a file system without hard links: an exclusive create, then the content
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(new.read_text())
        return True

    def _remove_stale(self, holder: dict[str, Any] | None) -> None:
        """Move the stale lock ``holder`` aside and delete it (or put back a live one that took its place)."""
        aside = self.out / f".{LOCK_NAME}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # gone meanwhile
        moved = _read(aside)
        if moved != holder:  # a racer's fresh lock replaced the stale one between our read and the rename
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise TrainError(_held_message(self.out, moved or {}))
        aside.unlink()
        log.info("note: replaced the stale lock of pid %s (no longer running) in %s", (holder or {}).get("pid"),
                 self.out)

    def release(self) -> None:
        """Remove the lock if this process holds it, and ``out`` if this run created it and it is empty."""
        if self._held:
            holder = _read(self.path) or {}
            if (holder.get("host"), holder.get("pid")) == (socket.gethostname(), os.getpid()):
                self.path.unlink(missing_ok=True)
            _HELD.discard(self.out.absolute())
            self._held = False
        if self._created:
            try:
                self.out.rmdir()  # only if empty
            except OSError:
                pass
            self._created = False
