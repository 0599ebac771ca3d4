"""Counting correct predictions, and writing one metrics line per epoch (``metrics.jsonl``, optionally TensorBoard)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainError

__all__ = ["topk_correct", "MetricsWriter"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have the target among their top-k logits, for each k (capped at the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks]).double()


class MetricsWriter:
    """Appends one JSON object per epoch to ``<out>/metrics.jsonl`` (and TensorBoard scalars if asked).

    Args:
        out: The run folder.
        tensorboard: Also write ``<out>/tb`` event files; needs the ``tensorboard`` package.
        keep_until: On resume, drop lines of epochs after this one (they belong to the interrupted future).
    """

    def __init__(self, out: Path, *, tensorboard: bool = False, keep_until: int | None = None) -> None:
        self.path = out / "metrics.jsonl"
        self.epochs: list[dict[str, Any]] = []
        if keep_until is not None and self.path.exists():
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.epochs = [m for m in lines if m["epoch"] <= keep_until]
        self.path.write_text("".join(json.dumps(m) + "\n" for m in self.epochs))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(out / "tb"))

    def write(self, metrics: dict[str, Any]) -> None:
        if any(m["epoch"] == metrics["epoch"] for m in self.epochs):
            return
        self.epochs.append(metrics)
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, metrics["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
