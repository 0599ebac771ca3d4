"""Exported weights: an SE model's ``state_dict`` as safetensors, and beside it the JSON config that rebuilds it.

``python -m se_surgery.export RUN/best.pt OUT.safetensors`` writes two files, as Hugging Face does
(``model.safetensors`` + ``config.json``):

- ``OUT.safetensors``: the model's tensors under their ``state_dict`` names, its metadata ``format`` (``pt``) and
  ``arch``. No code, no pickle: any safetensors reader loads it, and for a torchvision ResNet/ResNeXt with the
  default SE its keys are those of timm's ``seresnet*``/``seresnext*`` (:func:`timm_twin`);
- ``OUT.json`` (the same name, ``.json``): the checkpoint's ``model_config``, with its recipe ``config``, ``epoch``,
  ``step`` and ``metrics``. :func:`se_surgery.load_checkpoint` reads the pair and rebuilds the model from it.

Both are written atomically (a temporary file in the same folder, fsynced, then ``os.replace``), weights first.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .atomic import replace_atomically, sync_folder

__all__ = ["SUFFIX", "check_target", "config_path", "read_export", "timm_twin", "write_export"]

SUFFIX = ".safetensors"
_KEPT = ("model_config", "config", "epoch", "step", "metrics")  # what of a checkpoint the config file carries
_TWIN = re.compile(r"(resnet|resnext)\d+\w*")


def config_path(weights: str | os.PathLike) -> Path:
    """The config file beside exported weights: ``OUT.safetensors`` -> ``OUT.json``."""
    return Path(weights).with_suffix(".json")


def timm_twin(model_config: dict[str, Any]) -> str | None:
    """The timm SE model whose ``state_dict`` keys an export of ``model_config`` has (loads strict), or ``None``.

    A torchvision ``resnet*``/``resnext*`` with SE in every block at the standard position, the paper's squeeze and
    sigmoid, biases, no ``where``: ``resnet50`` -> ``seresnet50``. timm rounds the SE widths to multiples of 8
    (``make_divisible``), which only ``divisor=8`` gives everywhere; at r = 16, C / r is already a multiple of 8 for
    C >= 128, so ResNet-50 and wider match with or without it, ResNet-18/34 (64 channels) only with it.
    """
    arch, surgery = model_config.get("arch", ""), model_config.get("surgery")
    if not _TWIN.fullmatch(arch) or not surgery or surgery.get("where") or model_config.get("arch_kwargs"):
        return None
    options = {"reduction": 16, "position": "standard", "squeeze": "avg", "excitation": "sigmoid", "bias": True,
               "se_layer": None}
    if any(surgery.get(k, v) != v for k, v in options.items()):
        return None
    divisor = surgery.get("divisor")
    if divisor != 8 and (divisor is not None or arch in ("resnet18", "resnet34")):  # C = 64: C // 16 = 4, timm's 8
        return None
    return f"se{arch}"


def check_target(out: str | os.PathLike, *, force: bool = False) -> Path:
    """``out`` as a path, checked to be somewhere exported weights may go: it ends in ``.safetensors`` and, unless
    ``force``, neither it nor its config exists yet.

    Raises:
        CheckpointError: the wrong suffix, or a file that would be replaced without ``force``.
    """
    out = Path(out)
    if out.suffix != SUFFIX:
        raise CheckpointError(f"OUT {out} must end in {SUFFIX}, which load_checkpoint reads as exported weights: pass "
                              f"e.g. {out.with_suffix(SUFFIX)}")
    existing = [str(p) for p in (out, config_path(out)) if p.exists()]
    if existing and not force:
        verb, them = ("exist", "them") if len(existing) > 1 else ("exists", "it")
        raise CheckpointError(f"{' and '.join(existing)} already {verb}: pass --force to replace {them}, or pick "
                              "another OUT")
    return out


def write_export(out: str | os.PathLike, payload: dict[str, Any], *, force: bool = False) -> Path:
    """Write a checkpoint ``payload``'s ``model`` (a ``state_dict``) to ``out`` (``.safetensors``) and its
    ``model_config``, ``config``, ``epoch``, ``step`` and ``metrics`` to :func:`config_path` ``(out)``; return
    ``out``.

    Raises:
        CheckpointError: ``out`` refused by :func:`check_target`, a payload whose model is no ``state_dict`` or
            whose config is not JSON-able, or a write that fails (an existing file then keeps what it held).
    """
    out = check_target(out, force=force)
    state = payload.get("model")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("the checkpoint's model entry is not a state_dict: use a checkpoint written by "
                              "python -m se_surgery.train")
    info = {k: payload[k] for k in _KEPT if k in payload}
    try:
        text = json.dumps(info, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's config is not JSON-able ({e}): use a checkpoint written by "
                              "python -m se_surgery.train") from None
    from safetensors.torch import save

    # contiguous copies in their own memory: safetensors refuses views and tensors that share storage
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    metadata = {"format": "pt", "arch": str(info.get("model_config", {}).get("arch", ""))}
    _write_atomic(out, save(tensors, metadata=metadata))
    _write_atomic(config_path(out), text.encode())
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path``: a reader (or a crash) sees the old file or the new one, never half of it."""
    replaced = False
    try:
        replace_atomically(path, lambda f: f.write(data))
        replaced = True
        sync_folder(path.parent)
    except OSError as e:
        from ..cli import os_advice

        if replaced:
            kept = "it is written but its folder could not be synced"
        else:
            kept = "it keeps what it held" if path.exists() else "nothing was written there"
        raise CheckpointError(f"cannot write {path} ({e.strerror or e}): {kept}; {os_advice(e)}") from None


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, info)`` of exported weights: the tensors (on the CPU) and the config file beside them.

    Raises:
        CheckpointError: a missing or damaged file, or a config that is missing or holds no ``model_config``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no exported weights at {path}: check the path (python -m se_surgery.export writes "
                              "OUT.safetensors and OUT.json)")
    beside = config_path(path)
    if not beside.is_file():
        raise CheckpointError(f"{path} has no config beside it ({beside.name}, which rebuilds its model): put the "
                              f"{beside.name} that python -m se_surgery.export wrote next to it, or export again")
    try:
        info = json.loads(beside.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{beside} is not a readable JSON config ({e}): export the checkpoint again") from None
    if not isinstance(info, dict) or not isinstance(info.get("model_config"), dict):
        raise CheckpointError(f"{beside} holds no model_config: use the config python -m se_surgery.export wrote "
                              "beside the weights, or export again")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is damaged or not a safetensors file ({first}): export again") from None
    return state, info
