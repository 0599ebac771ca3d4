"""Weights files in: the one reader of every format the trainer's and the analysis's ``--weights`` take.

:func:`read_weights` returns the tensors of

- a ``state_dict`` saved with ``torch.save``;
- a ``.safetensors`` file (timm's ``model.safetensors``, torchvision- or timm-keyed), told by its header;
- a timm ``train.py`` checkpoint (``state_dict``, ``state_dict_ema``, ``args``, ...);
- a torchvision-reference checkpoint (``model``, ``model_ema``, ``args``, ...);
- an se-surgery checkpoint (``model_config`` + ``model``);

and with ``ema=True`` the EMA weights (``state_dict_ema`` / ``model_ema``). Nothing of a file's pickle runs: torch
files are read with ``weights_only=True``, with ``argparse.Namespace`` allowed (the ``args`` of timm and torchvision
checkpoints) and nothing else. :func:`fit_prefix` strips wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``),
:func:`holds_se` tells plain weights (loaded before ``add_se``) from SE weights (after), and :func:`load_weights`
loads strict and names every key that does not fit on one line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..surgery.naming import SE_LEAF
from .checkpoint import _looks_like

__all__ = ["read_weights", "fit_prefix", "holds_se", "load_weights"]

log = logging.getLogger(__name__)

FORMATS = ("a state_dict saved with torch.save, a .safetensors file, or a timm, torchvision-reference or "
           "se-surgery training checkpoint")
_PLAIN_KEYS = ("state_dict", "model", "model_state_dict")  # timm / Lightning, torchvision and ours, tutorials
_EMA_KEYS = ("state_dict_ema", "model_ema")  # timm train.py, torchvision references
_WRAPPERS = ("module.", "model.", "_orig_mod.")  # DDP / DataParallel / AveragedModel, Lightning, torch.compile
_MAX_WRAPPERS = 4
_RESAVE = ("save its weights alone where you trust the file: torch.save(torch.load(FILE, weights_only=False)"
           "['state_dict'], 'weights.pth') (['model'] for a torchvision checkpoint)")
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_weights(path: str | os.PathLike, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, whatever its format (see the module docstring); never runs pickled code.

    Args:
        path: The file.
        ema: Pick the EMA weights of a timm (``state_dict_ema``) or torchvision-reference (``model_ema``) checkpoint.

    Returns:
        ``name -> tensor`` as saved (wrapper prefixes are left to :func:`fit_prefix`; torchvision's
        ``AveragedModel`` wrapper of ``model_ema`` is taken off, its ``n_averaged`` counter dropped).

    Raises:
        CheckpointError: missing, damaged, carrying objects other than tensors and plain data, holding no dict of
            tensors, or (``ema``) holding no EMA weights; one line with the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}: pass {FORMATS}")
    with open(path, "rb") as f:
        head = f.read(9)
    if not head.startswith((b"PK\x03\x04", b"\x80")) and (path.suffix == ".safetensors" or head[8:9] == b"{"):
        state = _read_safetensors(path)
        if ema:
            raise CheckpointError(f"{path} holds no EMA weights (a .safetensors file holds one set of weights): "
                                  "drop --ema")
        return state
    return _pick(_torch_load(path, head), path, ema=ema)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is a damaged .safetensors file ({first}): download or save it again") from None


@contextlib.contextmanager
def _namespace_allowed() -> Iterator[None]:
    """``argparse.Namespace`` (a timm or torchvision checkpoint's ``args``) allowed in ``weights_only`` loads."""
    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; 2.4 has only add_safe_globals
    if scoped is not None:
        with scoped([argparse.Namespace]):
            yield
    else:
        torch.serialization.add_safe_globals([argparse.Namespace])
        yield


def _torch_load(path: Path, head: bytes) -> Any:
    """``torch.load(path, weights_only=True)`` with Namespace allowed; each failure one line with its fix."""
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip; older torch a pickle (protocol 2+)
        raise CheckpointError(f"{path} is not a torch weights file ({_looks_like(head[:8])}): pass {FORMATS}")
    try:
        with _namespace_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code or objects; a truncated zip, or not a torch file, otherwise
        text = str(e).strip()
        if isinstance(e, pickle.UnpicklingError):
            found = _UNSUPPORTED.search(text)
            what = found.group(1) if found else "objects other than tensors, plain data and argparse.Namespace"
            if _has_namespace(path):
                what += ", e.g. in its args: an argparse.Namespace loads, with plain data in it only"
            raise CheckpointError(
                f"{path} holds more than tensors and plain data ({what}); refusing to run its code: {_RESAVE}"
            ) from None
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise CheckpointError(f"{path} is damaged or not a torch weights file ({first}): save the weights again") \
            from None


def _has_namespace(path: Path) -> bool:
    """Whether the file's pickle names ``argparse.Namespace``: its opcodes are parsed, never executed."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            data = z.read(name) if name else b""
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" and arg == "argparse Namespace":
                return True
            if isinstance(arg, str):
                strings.append(arg)
            if op.name == "STACK_GLOBAL" and strings[-2:] == ["argparse", "Namespace"]:
                return True
    except Exception:  # not a zip, or a pickle pickletools cannot follow: say nothing of args
        return False
    return False


def _tensors(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _pick(payload: Any, path: Path, *, ema: bool) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded file: the file itself, or its EMA / plain weights entry."""
    if _tensors(payload):
        if ema:
            raise CheckpointError(f"{path} holds no EMA weights (it is a plain state_dict of {len(payload)} "
                                  f"tensors): drop --ema")
        return payload
    if isinstance(payload, dict):
        keys = _EMA_KEYS if ema else _PLAIN_KEYS
        for key in keys:
            if _tensors(payload.get(key)):
                state = payload[key]
                if key == "model_ema":  # torchvision's ExponentialMovingAverage, an AveragedModel: module.* + counter
                    state = {k: v for k, v in state.items() if k != "n_averaged"}
                    if all(k.startswith("module.") for k in state):
                        state = {k.removeprefix("module."): v for k, v in state.items()}
                log.info("%s: the weights under %r", path, key)
                return state
        if ema and any(_tensors(payload.get(k)) for k in _PLAIN_KEYS):
            raise CheckpointError(f"{path} holds no EMA weights (it holds {_describe(payload, why=False)}; no "
                                  f"{' or '.join(_EMA_KEYS)}): drop --ema")
    raise CheckpointError(f"{path} holds no state_dict (it holds {_describe(payload)}): pass {FORMATS}")


def _describe(payload: Any, *, why: bool = True) -> str:
    """What a loaded file holds, in words; ``why``: and why no state_dict was found in a dict."""
    if isinstance(payload, dict):
        names = [str(k) for k in payload]
        listed = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
        tensors = [n for n in _PLAIN_KEYS if n in payload]
        kind = f"whose {', '.join(tensors)} is not a dict of tensors" if tensors else "without a dict of tensors"
        return (f"a dict of {listed}" + (f", {kind}" if why else "")) if names else "an empty dict"
    if isinstance(payload, torch.Tensor):
        return f"a single tensor of shape {tuple(payload.shape)}"
    if isinstance(payload, (list, tuple)):
        return f"a {type(payload).__name__} of {len(payload)} items"
    return f"a {type(payload).__name__}"


def _stripped(state: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    """``state`` with ``prefix`` taken off the keys that have it; ``None`` if two keys would then collide."""
    out = {k.removeprefix(prefix): v for k, v in state.items()}
    return out if len(out) == len(state) else None


def fit_prefix(state: Mapping[str, torch.Tensor], keys: Collection[str]) -> dict[str, torch.Tensor]:
    """``state`` with a wrapper prefix stripped (``module.``, ``model.``, ``_orig_mod.``, repeated or combined, e.g.
    ``module.model.``) when the stripped keys fit ``keys`` (the target model's ``state_dict`` keys) better; else as
    it is (a model whose own keys start with ``model.`` keeps them)."""
    keys = set(keys)
    best, best_fit, best_prefix = dict(state), len(keys.intersection(state)), ""
    frontier = [""]
    for _ in range(_MAX_WRAPPERS):
        frontier = [p + w for p in frontier for w in _WRAPPERS if any(k.startswith(p + w) for k in state)]
        for prefix in frontier:
            candidate = _stripped(state, prefix)
            fit = -1 if candidate is None else len(keys.intersection(candidate))
            if candidate is not None and fit > best_fit:  # shorter prefixes come first: a tie keeps the shorter
                best, best_fit, best_prefix = candidate, fit, prefix
    if best_prefix:
        log.info("weights: stripped the prefix %r (%d of %d keys then fit)", best_prefix, best_fit, len(state))
    return best


def _in_se_block(key: str) -> bool:
    return any(SE_LEAF.fullmatch(part) for part in key.split(".")[:-1])


def holds_se(state: Mapping[str, torch.Tensor], plain: nn.Module) -> bool:
    """Whether ``state`` holds SE weights: after :func:`fit_prefix`, it has keys the plain model lacks and every such
    key lies in an SE block (a name component matching :data:`~se_surgery.surgery.naming.SE_LEAF`, e.g.
    ``layer1.0.se.fc1.weight``). Plain weights load into the base model before ``add_se``, SE weights after."""
    own = plain.state_dict().keys()
    extra = [k for k in fit_prefix(state, own) if k not in own]
    return bool(extra) and all(_in_se_block(k) for k in extra)


def _listed(label: str, items: list[str]) -> str:
    return f"{label} {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


def load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str | os.PathLike,
    skip: Collection[str] = (), fix: str | None = None,
) -> None:
    """Load ``state`` (after :func:`fit_prefix`) into ``model``, strict except the keys in ``skip``.

    Args:
        model: The model to fill, in place.
        state: The tensors, e.g. from :func:`read_weights`.
        source: What ``state`` came from (the file), for the message.
        skip: Keys neither loaded nor reported, on either side: the caller's new classifier head.
        fix: The advice that ends the message; default: pass the ``--arch`` the weights were saved from.

    A missing BatchNorm ``num_batches_tracked`` counter is no mismatch (older torchvision files and some
    ``.safetensors`` omit it; the model keeps its own, as ``load_state_dict`` does for such files).

    Raises:
        CheckpointError: keys that don't fit, in one line: ``<source> does not fit <Model>: missing a, b, c
            (+N more); unexpected ...; wrong shape k (10, 512) vs (5, 512): <fix>``. The model is then unchanged.
    """
    skip = set(skip)
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    state = {k: v for k, v in fit_prefix(state, model.state_dict().keys()).items() if k not in skip}
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [_listed(label, keys) for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        advice = fix or ("pass the --arch (and --arch-kwargs) these weights were saved from; a classifier for "
                         "another class count is a new head")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {'; '.join(parts)}: {advice}")
    model.load_state_dict(state, strict=False)
    log.info("loaded %d tensors from %s into %s%s", len(state), source, type(model).__name__,
             f" (new: {', '.join(sorted(skip & set(model.state_dict())))})" if skip else "")
