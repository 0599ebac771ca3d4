"""``python -m tests.ddp_faults ARGS``: the trainer's CLI, with two tiny faulty models registered as timm archs.

Run once per rank (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` as torchrun sets them) to see how every
rank ends when one rank goes wrong. The faults live in the models, so the trainer runs unchanged:

- ``timm:nan_on_rank1``: rank 1's logits turn NaN from its ``NAN_FROM``-th training forward on;
- ``timm:drift_on_rank1``: rank 1 nudges a weight behind DDP's back at every training forward.
"""

import sys

import torch
import torch.distributed as dist
from timm.models import register_model
from torch import nn

from se_surgery.train.cli import main

NAN_FROM = 6  # with 4 steps an epoch: epoch 1 ends well (last.pt written), epoch 2's 2nd step goes NaN


class Faulty(nn.Module):
    """conv -> ReLU -> global average -> linear; the fault acts on rank 1 in training mode only."""

    def __init__(self, fault: str, num_classes: int) -> None:
        super().__init__()
        self.fault, self.calls = fault, 0
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        faulty = self.training and dist.is_initialized() and dist.get_rank() == 1
        if faulty and self.fault == "drift":
            with torch.no_grad():
                self.head.bias.add_(1e-3)
        logits = self.head(torch.relu(self.conv(x)).mean((2, 3)))
        self.calls += self.training
        if faulty and self.fault == "nan" and self.calls >= NAN_FROM:
            logits = logits * float("nan")
        return logits


@register_model
def nan_on_rank1(pretrained: bool = False, num_classes: int = 10, **_) -> nn.Module:
    return Faulty("nan", num_classes)


@register_model
def drift_on_rank1(pretrained: bool = False, num_classes: int = 10, **_) -> nn.Module:
    return Faulty("drift", num_classes)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
