"""The learning rate as a function of the position in the run, and the optimizer's parameter groups.

The rate of every step is computed from ``(epoch, step)`` alone (:func:`lr_at`), with no scheduler state: a
run stopped anywhere and resumed sets exactly the rates the uninterrupted run sets, and a resume that changes
``--lr``, ``--se-lr``, ``--schedule`` or the warmup takes the new rates from the next step on.

Two groups when a run starts from pretrained weights (or ``--se-lr`` is given): ``pretrained`` (the loaded weights,
at ``--lr``) and ``new`` (the SE blocks and a new head, at ``--se-lr``); a run from scratch has one group, as before.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

__all__ = ["lr_at", "param_groups", "set_lrs", "group_lrs"]


def lr_at(base: float, recipe: Any, epoch: int, step: int, steps_per_epoch: int) -> float:
    """A group's rate at optimizer step ``step`` of ``epoch`` (both from 0), from its base rate ``base``.

    ``step``: ``base`` times ``lr_gamma`` once per ``lr_step`` epochs done, multiplied in turn as ``StepLR`` does (so
    a run from before the per-step rates resumes on the same bits). ``cosine``: ``base (1 + cos(pi t)) / 2`` with
    ``t`` the fraction of the run's steps done, 0 at the end. A warmup of ``W`` steps (``warmup_epochs x
    steps_per_epoch``) multiplies either by ``(n + 1) / W`` for the ``n``-th step of the run.
    """
    done = epoch * steps_per_epoch + step
    if recipe.schedule == "cosine":
        lr = base * (0.5 * (1 + math.cos(math.pi * min(done / (recipe.epochs * steps_per_epoch), 1.0))))
    else:
        lr = base
        for _ in range(epoch // recipe.lr_step):
            lr *= recipe.lr_gamma
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    if done < warmup:
        lr *= (done + 1) / warmup
    return lr


def group_lrs(recipe: Any) -> dict[str, float]:
    """Each group's base rate: ``pretrained`` at ``--lr``, ``new`` at ``--se-lr`` (default ``--lr``)."""
    return {"pretrained": recipe.lr, "new": recipe.lr if recipe.se_lr is None else recipe.se_lr}


def param_groups(model: nn.Module, recipe: Any, new: Collection[str] | None,
                 frozen: Collection[str] = ()) -> list[dict[str, Any]]:
    """The optimizer's groups: ``new`` names the parameters at ``--se-lr`` (``None``: one group for all, at ``--lr``);
    the ``frozen`` ones are left out."""
    trained = [(name, p) for name, p in model.named_parameters() if name not in frozen]
    lrs = group_lrs(recipe)
    if new is None:
        return [{"params": [p for _, p in trained], "lr": recipe.lr, "name": "all"}]
    new = set(new)
    groups = [{"params": [p for n, p in trained if n not in new], "lr": lrs["pretrained"], "name": "pretrained"},
              {"params": [p for n, p in trained if n in new], "lr": lrs["new"], "name": "new"}]
    return [g for g in groups if g["params"]]


def set_lrs(optimizer: torch.optim.Optimizer, recipe: Any, epoch: int, step: int, steps_per_epoch: int) -> None:
    """Put each group's rate for the coming step (:func:`lr_at` of its base rate from the recipe)."""
    lrs = group_lrs(recipe)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(lrs.get(group.get("name"), recipe.lr), recipe, epoch, step, steps_per_epoch)
