"""Counting correct predictions; writing one metrics line per epoch (``metrics.jsonl``, TensorBoard), reading them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainError

__all__ = ["topk_correct", "MetricsWriter", "read_metrics", "METRICS_NAME"]

METRICS_NAME = "metrics.jsonl"


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have the target among their top-k logits, for each k (capped at the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks]).double()


def read_metrics(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of the run folder ``out``'s ``metrics.jsonl`` in order, one dict per epoch; ``[]`` when there is none.

    A last line cut short (no newline, not JSON: the trainer was killed while writing it) is left out: resuming
    from ``last.pt`` writes that epoch's line again. Any other line that is not a JSON object comes back as ``{}``, a
    line of unknown content: it still counts as a result, but holds no numbers. Blank lines are skipped.

    Examples:
        >>> [m["val_top1"] for m in read_metrics("runs/demo")]  # doctest: +SKIP
        [91.1, 96.4, 98.3]
    """
    try:
        text = (Path(out) / METRICS_NAME).read_text()
    except FileNotFoundError:
        return []
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break  # torn by a kill
            row = None
        rows.append(row if isinstance(row, dict) else {})
    return rows


class MetricsWriter:
    """Appends one JSON object per epoch to ``<out>/metrics.jsonl`` (and TensorBoard scalars if asked).

    Args:
        out: The run folder.
        tensorboard: Also write ``<out>/tb`` event files; needs the ``tensorboard`` package.
        keep_until: On resume, drop lines of epochs after this one (they belong to the interrupted future).
    """

    def __init__(self, out: Path, *, tensorboard: bool = False, keep_until: int | None = None) -> None:
        self.path = out / METRICS_NAME
        self.epochs: list[dict[str, Any]] = []
        if keep_until is not None:
            kept = [m for m in read_metrics(out) if isinstance(m.get("epoch"), int)]
            self.epochs = [m for m in kept if m["epoch"] <= keep_until]
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
