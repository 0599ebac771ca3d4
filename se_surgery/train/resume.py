"""Continuing a run: which checkpoint ``--resume`` means (read once), and what of it the new recipe may change.

The CLI needs the resumed run's recipe before training starts and the trainer needs its weights and states: both
take them from the one :class:`ResumePoint` that :func:`resolve_resume` returns.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainError
from .checkpoint import read_checkpoint
from .distributed import is_rank_zero
from .metrics import METRICS_NAME, read_metrics
from .recipe import Recipe
from .run_lock import refuse_if_held

__all__ = ["ResumePoint", "resolve_resume", "RESUME_MAY_CHANGE", "check_resume_changes", "check_same_model",
           "apply_schedule_changes"]

log = logging.getLogger(__name__)
_MODEL_KEYS = ("arch", "arch_kwargs", "surgery", "num_classes", "class_names")


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: ``path`` and the payload ``state`` of the checkpoint it continues, or both ``None``."""

    path: Path | None = None
    state: dict[str, Any] | None = None

    @property
    def config(self) -> dict[str, Any] | None:
        """The resumed run's recipe (a :meth:`Recipe.to_dict`), or ``None`` for a fresh start."""
        return None if self.state is None else self.state["config"]


def resolve_resume(resume: str | Path | ResumePoint | None, out: Path) -> ResumePoint:
    """What ``--resume`` means for the run folder ``out``; the checkpoint, if any, is read here and only here.

    Args:
        resume: ``None`` (a fresh run: ``out`` must not hold one), ``"auto"`` (``out/last.pt`` if it exists, else a
            fresh start, unless ``out`` holds results) or a checkpoint path. A :class:`ResumePoint` is returned as
            it is.
        out: The run folder.

    Raises:
        TrainError: another trainer holds ``out``; ``resume`` is ``None`` but ``out`` already holds a run; or it is
            ``"auto"`` and ``out`` holds results (``best.pt``, trained epochs in ``metrics.jsonl``) but no
            ``last.pt`` to continue them from.
        CheckpointError: the checkpoint is missing (an explicit path), damaged or foreign.
    """
    if isinstance(resume, ResumePoint):
        return resume
    out = Path(out)
    if is_rank_zero():  # rank 0 holds the lock; the other ranks would see their own job's
        refuse_if_held(out)
    if resume is None:
        for name in ("config.json", "last.pt", "best.pt", METRICS_NAME):
            if (out / name).exists():
                raise TrainError(
                    f"{out} already holds a run ({name}): pass --resume auto to continue it, or choose another --out"
                )
        return ResumePoint()
    path = out / "last.pt" if str(resume) == "auto" else Path(resume)
    if str(resume) == "auto" and not path.exists():
        _refuse_results_without_last(out)
        return ResumePoint()
    return ResumePoint(path, read_checkpoint(path))


def _trained_epochs(out: Path) -> int:
    """How many lines of ``out/metrics.jsonl`` record a trained epoch (an epoch-0 evaluation does not; garbage may)."""
    return sum(row.get("epoch") != 0 for row in read_metrics(out))


def _refuse_results_without_last(out: Path) -> None:
    """``--resume auto`` without ``last.pt``: a fresh start would overwrite ``best.pt`` and the metrics; refuse it."""
    best, epochs = (out / "best.pt").exists(), _trained_epochs(out)
    if not (best or epochs):
        return
    results = " and ".join((["best.pt"] if best else []) + ([f"{epochs} epoch(s) in {METRICS_NAME}"] if epochs else []))
    fix = (f"pass --resume {out / 'best.pt'} to continue from the best epoch (the epochs after it are trained again), "
           if best else "")
    raise TrainError(f"{out} holds {results} but no last.pt, so --resume auto has nothing to continue and a fresh "
                     f"start would overwrite them: {fix}or pass another --out for a new run")


# What a resume may change. True: the flag wins over the checkpoint's recipe. False: the flag would make the rest
# of the run train something else than its first epochs did (another model, data, stream of batches or crops), so
# a resume that changes it is refused, naming the fields. A new Recipe field must be added here
# (tests/test_run_folder.py checks that every field is).
RESUME_MAY_CHANGE: dict[str, bool] = {
    # what is trained: the model and its SE surgery
    "arch": False, "arch_kwargs": False, "se": False, "reduction": False, "se_init": False, "position": False,
    "squeeze": False, "excitation": False, "se_bias": False, "divisor": False, "where": False,
    "pretrained": False,
    # what it starts from and which of its parameters train (the weights are read at the start only)
    "weights": False, "ema": False, "new_head": False, "freeze_backbone": False, "gate_start": False,
    # on what: the data, the stream of batches (seed, batch, epoch length, sampling) and the crops
    "data": False, "seed": False, "batch_size": False, "num_samples": False, "class_aware": False,
    "input_size": False, "resize": False, "min_scale": False, "flip": False, "mean": False, "std": False,
    "classes": False,
    # which val images rank the epochs: best.pt is the best of comparable numbers only
    "val_samples": False,
    # the schedule: the user's to change, as the paper's step decay is changed by hand
    "epochs": True, "lr": True, "lr_step": True, "lr_gamma": True, "momentum": True, "weight_decay": True,
    "se_lr": True, "schedule": True, "warmup_epochs": True,
    # how the same global batch is split and normalised: like the number of GPUs, which a resume may change too
    "accum_steps": True, "sync_bn": True,
    # speed and bookkeeping: the same images in the same order (amp and compile change float rounding only)
    "workers": True, "amp": True, "channels_last": True, "compile": True, "eval_batch_size": True,
    "ckpt_every": True,
}


def check_resume_changes(saved: dict[str, Any], recipe: Recipe, path: Path) -> None:
    """Refuse a resume whose ``recipe`` changes what is trained (see :data:`RESUME_MAY_CHANGE`); log what changed.

    Args:
        saved: The resumed checkpoint's recipe (its ``config``).
        recipe: The resolved recipe of the resumed run.
        path: The checkpoint, for the message.

    Raises:
        TrainError: naming every refused field with its old -> new value.
    """
    defaults = Recipe().to_dict()  # a field newer than the checkpoint had its default then
    now = recipe.to_dict()
    changed = [k for k in now if saved.get(k, defaults[k]) != now[k]]
    refused = [k for k in changed if not RESUME_MAY_CHANGE.get(k, False)]

    def diff(keys: list[str]) -> str:
        return ", ".join(f"{k} {_short(saved.get(k, defaults[k]))} -> {_short(now[k])}" for k in keys)

    if refused:
        raise TrainError(f"{path} was trained with another {', '.join(refused)} ({diff(refused)}): a resume may "
                         "change the schedule and speed flags only; leave these flags out (or pass the run's own "
                         "values), or start a new run in another --out")
    if changed:
        log.info("resume: %s", diff(changed))


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_same_model(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Refuse to load a checkpoint's weights into a model built from another ``model_config``."""
    for key in _MODEL_KEYS:
        if saved.get(key) != now.get(key):
            raise TrainError(
                f"{path} was trained with another {key} ({str(saved.get(key))[:80]} vs now {str(now.get(key))[:80]}): "
                "resume it with the same --arch/--data/SE options, or start a new run in another --out"
            )


def apply_schedule_changes(saved: dict[str, Any], recipe: Recipe, optimizer: torch.optim.Optimizer) -> None:
    """On resume, let explicitly changed optimisation flags win over the restored optimizer state.

    Momentum and weight decay go into every group. The learning rates need nothing here: the trainer sets each
    group's rate before every step from the recipe and the position (:mod:`se_surgery.train.schedule`), so a changed
    ``--lr``, ``--se-lr``, ``--schedule``, ``--lr-step``, ``--lr-gamma`` or ``--warmup-epochs`` applies from the
    next step on; it is logged.
    """
    for group in optimizer.param_groups:
        group.update(momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    defaults = Recipe().to_dict()  # a field newer than the checkpoint had its default then
    keys = ("lr", "se_lr", "schedule", "lr_step", "lr_gamma", "warmup_epochs")
    if any(saved.get(k, defaults[k]) != getattr(recipe, k) for k in keys):
        log.info("resume: learning-rate schedule changed to %s", ", ".join(f"{k} {getattr(recipe, k)}" for k in keys))
