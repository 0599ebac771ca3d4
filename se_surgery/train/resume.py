"""Continuing a run: which checkpoint ``--resume`` means (read once), and what of it the new recipe may change.

The CLI needs the resumed run's recipe before training starts and the trainer needs its weights and states: both
take them from the one :class:`ResumePoint` that :func:`resolve_resume` returns.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainError
from .checkpoint import read_checkpoint
from .recipe import Recipe
from .run_lock import refuse_if_held

__all__ = ["ResumePoint", "resolve_resume", "check_same_model", "apply_schedule_changes"]

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
            fresh start) or a checkpoint path. A :class:`ResumePoint` is returned as it is.
        out: The run folder.

    Raises:
        TrainError: another trainer holds ``out``, or ``resume`` is ``None`` but ``out`` already holds a run.
        CheckpointError: the checkpoint is missing (an explicit path), damaged or foreign.
    """
    if isinstance(resume, ResumePoint):
        return resume
    out = Path(out)
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 holds the lock; the other ranks would see their own job's
        refuse_if_held(out)
    if resume is None:
        for name in ("config.json", "last.pt", "metrics.jsonl"):
            if (out / name).exists():
                raise TrainError(
                    f"{out} already holds a run ({name}): pass --resume auto to continue it, or choose another --out"
                )
        return ResumePoint()
    path = out / "last.pt" if str(resume) == "auto" else Path(resume)
    if str(resume) == "auto" and not path.exists():
        return ResumePoint()
    return ResumePoint(path, read_checkpoint(path))


def check_same_model(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Refuse to load a checkpoint's weights into a model built from another ``model_config``."""
    for key in _MODEL_KEYS:
        if saved.get(key) != now.get(key):
            raise TrainError(
                f"{path} was trained with another {key} ({str(saved.get(key))[:80]} vs now {str(now.get(key))[:80]}): "
                "resume it with the same --arch/--data/SE options, or start a new run in another --out"
            )


def apply_schedule_changes(saved: dict[str, Any], recipe: Recipe, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.StepLR, epoch: int) -> None:
    """On resume, let explicitly changed optimisation flags win over the restored optimizer/scheduler state."""
    for group in optimizer.param_groups:
        group.update(momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    keys = ("lr", "lr_step", "lr_gamma")
    if all(saved.get(k) == getattr(recipe, k) for k in keys):
        return  # keep the restored state bit for bit
    scheduler.step_size, scheduler.gamma = recipe.lr_step, recipe.lr_gamma
    scheduler.base_lrs = [recipe.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = recipe.lr
        group["lr"] = recipe.lr * recipe.lr_gamma ** (epoch // recipe.lr_step)
    log.info("resume: learning-rate schedule changed to lr %g, /%g every %d epochs", recipe.lr,
             1 / recipe.lr_gamma, recipe.lr_step)
