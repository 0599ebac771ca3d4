"""The trainer: the SENet paper's recipe with class-aware sampling, on one CPU or many GPUs (``torchrun``).

``python -m se_surgery.train`` is :mod:`.cli` (via ``__main__``); :func:`train` is the same from Python. One concept
per module: :mod:`.recipe` (the paper's numbers), :mod:`.data`, :mod:`.sampling` (Relay Backpropagation),
:mod:`.seeding`, :mod:`.distributed`, :mod:`.models` (a model from a plain-data config), :mod:`.checkpoint`,
:mod:`.image_check` (a data folder's unreadable files, once), :mod:`.metrics`, :mod:`.resume` (what ``--resume``
continues and what it may change), :mod:`.run_lock` (one trainer per run folder) and :mod:`.loop` (the training loop
itself).
"""

from .checkpoint import load_checkpoint
from .loop import train
from .recipe import PAPER, RECIPES, Recipe, get_recipe
from .sampling import ClassAwareSampler

__all__ = ["train", "Recipe", "get_recipe", "RECIPES", "PAPER", "ClassAwareSampler", "load_checkpoint"]
