"""Checkpoints: atomic writes, ``weights_only`` reads, and the model rebuilt from the config saved beside its weights.

A checkpoint is a dict of plain data and tensors only, so ``torch.load(path, weights_only=True)`` reads it:
``model`` (state_dict), ``model_config`` (see :mod:`se_surgery.train.models`), ``config`` (the resolved recipe),
``epoch`` (epochs completed), ``epoch_step`` (optimizer steps into the next epoch), ``step`` (optimizer steps in all),
``metrics`` (the last epoch's), plus the trainer's ``optimizer``, ``groups`` (the names of the parameters at
``--se-lr`` and of the frozen ones; ``None``: one group), ``sampler`` and ``progress`` states (checkpoints written
before the learning rate was set per step also hold a ``scheduler`` state, which is no longer needed). There is no
RNG state to restore: the trainer reseeds from ``(seed, epoch, step, rank)`` at every step.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..archs import TIMM_PREFIX
from ..cli import os_advice
from ..errors import CheckpointError, SurgeryError, TrainError
from .atomic import TMP, replace_atomically, sync_folder
from .exported import SUFFIX, read_export
from .models import build_model, check_factory

__all__ = ["load_plain", "save_checkpoint", "remove_stale_temps", "read_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a reader (or a crash at any moment) sees the old file or the new one.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, then ``os.replace`` puts the
    file in place and the folder is fsynced so that the rename itself survives a power cut. On any failure (a full
    disk, Ctrl-C) the temporary file is removed and ``path`` keeps what it held.

    Raises:
        CheckpointError: the file system refused the write (full disk, read-only, ...); ``path`` is unchanged.
    """
    path = Path(path)
    replaced = False
    try:
        replace_atomically(path, lambda f: torch.save(payload, f))
        replaced = True
        sync_folder(path.parent)
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports a failed write of the file object as a RuntimeError raised from the OSError
        error = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        if not isinstance(error, OSError):
            raise
        raise CheckpointError(_write_failed(path, error, replaced)) from None
    return path


def _write_failed(path: Path, error: OSError, replaced: bool) -> str:
    advice = f"{os_advice(error, folder=path.parent)}, then resume with --resume auto"
    if replaced:
        kept = f"{path.name} is written but its folder could not be synced"
    else:
        kept = f"{path.name} still holds the previous checkpoint" if path.exists() else f"no {path.name} was written"
    return f"cannot write the checkpoint {path} ({error.strerror or error}): {kept}; {advice}"


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed :func:`save_checkpoint` calls left in ``folder``; return them.

    Only safe while no other process saves into ``folder``: the trainer calls it holding the run folder's lock.
    """
    pattern = re.compile(rf"\..+{re.escape(TMP)}\d+")
    stale = sorted(p for p in Path(folder).glob(f".*{TMP}*") if pattern.fullmatch(p.name) and p.is_file())
    if stale:
        size = sum(p.stat().st_size for p in stale)
        for p in stale:
            p.unlink(missing_ok=True)
        log.info("note: removed %d temporary file(s) of an interrupted checkpoint save from %s (%.1f MB): %s",
                 len(stale), folder, size / 2**20, ", ".join(p.name for p in stale))
    return stale


def load_plain(
    path: str | os.PathLike, map_location: Any = "cpu", *, missing: str, unsafe: str, damaged: str,
    what: str = "file",
) -> Any:
    """``torch.load(path, weights_only=True)``, each failure one line that ends in the caller's advice.

    A file that carries code is refused before any of it runs (``weights_only``); ``missing``, ``unsafe`` and
    ``damaged`` say what to do about a missing file (or one that is no torch file at all: an image, JSON), such a
    file, and a truncated one.

    Raises:
        CheckpointError: one of those three.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {what} at {path}: {missing}")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip; older torch a pickle (protocol 2+)
        raise CheckpointError(f"{path} is not a torch {what} ({_looks_like(head)}): {missing}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for code; a truncated zip, or not a torch file at all, otherwise
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        if isinstance(e, pickle.UnpicklingError):
            raise CheckpointError(
                f"{path} holds more than tensors and plain data ({first}); refusing to run its code: {unsafe}"
            ) from None
        raise CheckpointError(f"{path} is damaged or not a torch {what} ({first}): {damaged}") from None


_KINDS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"\x1f\x8b": "gzip data",
          b"%PDF": "a PDF document", b"{": "JSON or other text", b"[": "JSON or other text"}


def _looks_like(head: bytes) -> str:
    """What a file that is no torch file seems to be, from its first bytes."""
    if not head:
        return "the file is empty"
    kind = next((k for magic, k in _KINDS.items() if head.lstrip().startswith(magic)), None)
    if kind is None and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        kind = "text"
    return f"it holds {kind}" if kind else f"it starts with the bytes {head!r}"


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The raw payload of an se-surgery checkpoint, read with ``weights_only=True``.

    Raises:
        CheckpointError: missing, truncated, not plain data, or not an se-surgery checkpoint.
    """
    path = Path(path)
    payload = load_plain(
        path, map_location, missing="check the path (a run folder holds last.pt and best.pt)",
        unsafe="re-save its state_dict with plain data, or use a checkpoint written by se_surgery.train",
        damaged="use another one (e.g. best.pt) or retrain", what="checkpoint",
    )
    if not isinstance(payload, dict) or "model_config" not in payload or "model" not in payload:
        raise CheckpointError(
            f"{path} is not an se-surgery checkpoint (no model_config/model): load it with torch.load, "
            "or use a checkpoint written by python -m se_surgery.train"
        )
    return payload


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", *, factory: str | None = None, trust: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as and load its weights.

    A model built by a factory of someone's code (``arch`` ``package.module:function``) is rebuilt only when
    ``factory`` names that factory again, or with ``trust``: a checkpoint alone never makes se-surgery import code.

    Args:
        path: A ``last.pt``/``best.pt`` written by ``python -m se_surgery.train``, or an ``OUT.safetensors`` written
            by ``python -m se_surgery.export`` (with its ``OUT.json`` beside it).
        map_location: Where to put the tensors (as in ``torch.load``).
        factory: The ``package.module:function`` the checkpoint's model is built with, named by the caller, who
            trusts it.
        trust: Import and call whatever factory the checkpoint names (only for a file you trust).

    Returns:
        ``(model, info)``: the model in eval mode, and everything else in the checkpoint (``model_config``,
        ``config``, ``epoch``, ``step``, ``metrics``, ...).

    Raises:
        UntrustedFactory: (a ``CheckpointError``) its model is built by a factory neither named nor trusted.
        CheckpointError: the file is missing, damaged, unsafe, foreign, or its weights do not fit its config.

    Examples:
        >>> model, info = load_checkpoint("runs/demo/best.pt")  # doctest: +SKIP
        >>> info["metrics"]["val_top1"], info["model_config"]["class_names"][:3]  # doctest: +SKIP
        (98.6, ['0', '1', '2'])
    """
    if Path(path).suffix == SUFFIX:
        state, info = read_export(path)
    else:
        payload = read_checkpoint(path, map_location)
        state, info = payload["model"], {k: v for k, v in payload.items() if k != "model"}
    config = info["model_config"]
    arch = config.get("arch") if isinstance(config, dict) else None
    own_code = isinstance(arch, str) and ":" in arch and not arch.startswith(TIMM_PREFIX)
    try:
        check_factory(config, factory, trust, what=str(path))
        model = build_model(config, trust=True)  # checked just above
        model.load_state_dict(state)
    except (TrainError, SurgeryError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0]
        if own_code and isinstance(e, TrainError):  # the factory's own one-line error, with its fix
            raise CheckpointError(f"{path}: cannot rebuild its model with the factory {arch}: {first}") from None
        if own_code:
            raise CheckpointError(f"{path}: cannot rebuild its model with the factory {arch} ({first}): has the "
                                  "factory's code changed since it was saved?") from None
        raise CheckpointError(
            f"{path}: cannot rebuild its model ({first}): is the installed se-surgery older?"
        ) from None
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval(), info
