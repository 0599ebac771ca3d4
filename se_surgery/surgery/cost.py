"""Parameters and multiply-adds of an SE model side by side with its base model (``python -m se_surgery.summary``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..modes import eval_mode

__all__ = ["Summary", "summary", "count_macs", "PAPER"]

# SENet (TPAMI), Table 2: parameters (M) and GFLOPs (multiply-adds) of the base network and its SE version, r = 16.
PAPER = {
    "resnet50": {"params": (25.6, 28.1), "gmacs": (3.86, 3.87)},
    "resnet101": {"params": (44.5, 49.3), "gmacs": (7.58, 7.60)},
    "resnet152": {"params": (60.2, 66.8), "gmacs": (11.30, 11.32)},
}


@dataclass(frozen=True)
class Summary:
    """Cost of the SE version next to its base (multiply-adds as counted by torch's flop counter: conv + linear)."""

    se_blocks: int
    params_base: int
    params_se: int
    macs_base: int
    macs_se: int

    @property
    def params_overhead(self) -> float:
        return self.params_se / self.params_base - 1

    @property
    def macs_overhead(self) -> float:
        return self.macs_se / self.macs_base - 1

    def __str__(self) -> str:
        return (
            f"{'':14}{'base':>14}{'SE':>14}{'overhead':>10}\n"
            f"{'parameters':14}{self.params_base:>14,}{self.params_se:>14,}{self.params_overhead:>+10.2%}\n"
            f"{'multiply-adds':14}{self.macs_base:>14,}{self.macs_se:>14,}{self.macs_overhead:>+10.2%}\n"
            f"({self.se_blocks} SE blocks)"
        )


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """Multiply-adds of one forward (half of torch's FLOP count, which counts 2 per multiply-add)."""
    ref = next(model.parameters())
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(input_size, device=ref.device, dtype=ref.dtype))
    return counter.get_total_flops() // 2


def summary(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 224, 224)) -> Summary:
    """Parameters and multiply-adds of ``model`` (an :func:`add_se` result) and of its base (all SE removed)."""
    from .rewrite import remove_se, se_blocks

    base = remove_se(model)
    return Summary(
        se_blocks=len(se_blocks(model)),
        params_base=sum(p.numel() for p in base.parameters()),
        params_se=sum(p.numel() for p in model.parameters()),
        macs_base=count_macs(base, input_size),
        macs_se=count_macs(model, input_size),
    )
