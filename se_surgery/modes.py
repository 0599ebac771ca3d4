"""Train/eval mode helpers shared by the surgery, the trainer and the analysis."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, then give every module its *own* train/eval flag back.

    ``model.train(was_training)`` would reset every child to the parent's mode, unfreezing a BatchNorm the user had
    put in eval mode on purpose (fine-tuning).
    """
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag
