"""Before training on a folder: every image file's header read once (cheap, no decode), the result cached.

A folder of a million images may hold a few files that are not images (a zero-byte download, an HTML error page
saved as ``.jpg``); a run should say so before its first step, not when the sampler first draws one. Rank 0 opens
each file with PIL (which reads the header only), and remembers the answer by the file's path, size and mtime in
``$XDG_CACHE_HOME/se-surgery/image-headers/`` (``~/.cache/...``), so a second run re-reads only what changed; the data
folder itself may be read-only, and a cache that cannot be written is skipped. Every rank gets rank 0's verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from ..errors import DataError
from .distributed import Env, all_sum

__all__ = ["check_image_headers", "cache_dir"]

log = logging.getLogger(__name__)
_SHOWN = 5  # names in the message
_VERSION = 1


def cache_dir() -> Path:
    """Where the header verdicts are kept: ``$XDG_CACHE_HOME/se-surgery/image-headers`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "se-surgery" / "image-headers"


def check_image_headers(root: str | os.PathLike, paths: Iterable[str], env: Env) -> None:
    """Raise the same :class:`DataError` on every rank if any of ``paths`` (files under ``root``) is not an image.

    Only rank 0 reads the files; the others wait for its verdict, so no rank trains while another stops.
    """
    message = _verdict(Path(root), list(paths)) if env.is_main else ""
    message = _from_rank0(message, env)
    if message:
        raise DataError(message)


def _verdict(root: Path, paths: list[str]) -> str:
    """The one-line complaint about the unreadable files among ``paths``, or ``""``."""
    root = Path(os.path.abspath(root.expanduser()))  # not resolve(): the files' paths keep a symlinked root's name
    cache_file = cache_dir() / f"{hashlib.sha256(str(root).encode()).hexdigest()[:24]}.json"
    cached = _read_cache(cache_file, root)
    results: dict[str, list] = {}
    todo = []
    for path in paths:
        rel = os.path.relpath(path, root)
        try:
            st = os.stat(path)
        except OSError as e:
            results[rel] = [0, 0, e.strerror or str(e)]
            continue
        entry = cached.get(rel)
        if entry is not None and entry[:2] == [st.st_mtime_ns, st.st_size]:
            results[rel] = entry
        else:
            todo.append((rel, path, st))
    if todo:
        log.info("checking the headers of %d image files under %s", len(todo), root)
        with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
            for (rel, _, st), problem in zip(todo, pool.map(_problem, [path for _, path, _ in todo])):
                results[rel] = [st.st_mtime_ns, st.st_size, problem]
        _write_cache(cache_file, root, {**cached, **results})  # a run on some classes keeps the others' verdicts
    bad = sorted(rel for rel, (_, _, problem) in results.items() if problem)
    if not bad:
        return ""
    shown = ", ".join(f"{rel} ({results[rel][2]})" for rel in bad[:_SHOWN])
    more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    return (f"{len(bad)} of {len(paths)} image files under {root} cannot be read: {shown}{more}; delete or replace "
            "them (or move them out of the folder)")


def _problem(path: str) -> str | None:
    """Why PIL cannot open ``path``'s header, or ``None``."""
    try:
        with Image.open(path):
            return None
    except Image.UnidentifiedImageError:
        return "not an image PIL can read"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return " ".join(str(getattr(e, "strerror", None) or e).split()) or type(e).__name__


def _read_cache(file: Path, root: Path) -> dict[str, list]:
    try:
        saved = json.loads(file.read_text())
        if saved.get("version") == _VERSION and saved.get("root") == str(root):
            return saved["files"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return {}


def _write_cache(file: Path, root: Path, results: dict[str, list]) -> None:
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": _VERSION, "root": str(root), "files": results}))
        os.replace(tmp, file)
    except OSError as e:
        log.debug("image header cache %s not written (%s)", file, e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _from_rank0(text: str, env: Env) -> str:
    """Rank 0's ``text`` on every rank, by two sums (the other ranks add zeros)."""
    if env.world_size == 1:
        return text
    data = text.encode() if env.is_main else b""
    size = int(all_sum(torch.tensor([float(len(data))], dtype=torch.float64), env).item())
    if size == 0:
        return ""
    codes = torch.zeros(size, dtype=torch.float64)
    if env.is_main:
        codes += torch.tensor(list(data), dtype=torch.float64)
    return bytes(int(c) for c in all_sum(codes, env).tolist()).decode()
