"""Parameters and multiply-adds of an SE model side by side with its base model (``python -m se_surgery.describe``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import SurgeryError
from ..modes import eval_mode
from ..paper import ABLATIONS, COST_TABLES, RESNET50

__all__ = ["Summary", "summary", "count_parameters", "count_macs", "paper_tables"]


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


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` (every tensor once, shared ones counted once, as ``model.parameters()`` yields them)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """Multiply-adds of one forward (half of torch's FLOP count, which counts 2 per multiply-add)."""
    ref = next(model.parameters())
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(input_size, device=ref.device, dtype=ref.dtype))
    return counter.get_total_flops() // 2


def summary(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 224, 224), **se_options: Any) -> Summary:
    """Parameters and multiply-adds of ``model`` (an :func:`add_se` result) and of its base (all SE removed).

    Args:
        model: an :func:`add_se` result, or a plain model, which then gets ``add_se(model, **se_options)`` first.
        input_size: the input the multiply-adds are counted on.
        se_options: :func:`add_se`'s keywords (``reduction``, ``where``, ``position``, ``squeeze``, ...).
    """
    from .insert import add_se
    from .remove import remove_se, se_blocks

    if se_options or not se_blocks(model):
        if se_blocks(model):
            raise SurgeryError(
                f"summary(..., {', '.join(se_options)}=...) needs the plain model; this one has SE blocks"
            )
        model = add_se(model, **se_options)
    base = remove_se(model)
    return Summary(
        se_blocks=len(se_blocks(model)),
        params_base=count_parameters(base),
        params_se=count_parameters(model),
        macs_base=count_macs(base, input_size),
        macs_se=count_macs(model, input_size),
    )


def paper_tables(
    make_base: Callable[[], nn.Module], input_size: tuple[int, ...] = (1, 3, 224, 224)
) -> list[dict[str, Any]]:
    """Our cost of every variant in :data:`se_surgery.paper.COST_TABLES` beside the paper's (its
    :data:`~se_surgery.paper.ABLATIONS`), one dict per row.

    Args:
        make_base: builds the plain network (``torchvision.models.resnet50``); called once.
        input_size: where multiply-adds are counted (only for rows whose table gives GFLOPs).
    """
    from .insert import add_se

    base = make_base()
    rows = []
    for key, variants in COST_TABLES.items():
        for label, options in variants.items():
            paper = RESNET50 if options is None else ABLATIONS[key].rows[label]
            model = base if options is None else add_se(base, **options)
            rows.append({
                "table": ABLATIONS[key].title, "variant": label, "options": options,
                "params": count_parameters(model), "paper params (M)": paper.params_m,
                "macs": count_macs(model, input_size) if paper.gflops is not None else None,
                "paper GFLOPs": paper.gflops,
            })
    return rows
