"""The paper's removal check (Sec. 7.2): accuracy with some SE blocks removed, or with their gates frozen.

Two ways to take a block's excitation out, next to the intact model:

- ``removed``: :func:`se_surgery.remove_se` takes the SE module out of the graph (its owner computes ``x``, not
  ``s * x``); torchvision's and timm's own SE modules (EfficientNet, MobileNetV3, RegNetY, SE-ResNet), each of which
  returns ``x * s``, become an identity. The saving is the SE's parameters.
- ``fixed``: the gate outputs its dataset-mean excitation (the all-class mean captured by
  :func:`analysis.capture_excitations`), a constant channel scale that could be folded into the preceding batch norm,
  so it saves the same parameters. It tells "the block is an identity" (a saturated SE_5_2) apart from "the block is
  a class-agnostic rescaling" (SE_5_3).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from analysis.capture import SEGates, find_gates, is_known_se
from analysis.collected import ExcitationStats
from analysis.errors import AnalysisError
from analysis.protocol import paper_stages
from se_surgery.modes import eval_mode
from se_surgery.surgery.cost import count_parameters
from se_surgery.train.metrics import topk_correct

__all__ = ["ConstantGate", "ablate", "ablation_blocks", "check_removable", "evaluate", "fix_gates", "remove_blocks"]

LAST_STAGE = "last-stage"
ALL_BLOCKS = "all"


class ConstantGate(nn.Module):
    """A gate that ignores its input and returns a fixed per-channel excitation, on the input's device and dtype.

    Args:
        value: ``(C,)`` excitation per channel (kept in its own precision, float64 from the captured means).
    """

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.value.to(device=x.device, dtype=x.dtype)
        return value.view(1, -1, *([1] * (x.dim() - 2))).expand_as(x)


def ablation_blocks(model: nn.Module, spec: str, found: SEGates | None = None) -> list[str]:
    """SE module names from ``--ablate``: comma-separated block names / paper names, ``last-stage`` or ``all``,
    each checked to be one :func:`remove_blocks` can take out.

    Args:
        model: The model to take blocks out of.
        spec: The ``--ablate`` text.
        found: ``SEGates.find(model)`` where the caller has it already.

    Raises:
        AnalysisError: unknown names (the valid ones are listed), a model without paper names for ``last-stage``,
            or a block the removal cannot take out.
    """
    found = SEGates.find(model) if found is None else found
    if spec.strip() == ALL_BLOCKS:
        blocks = found.blocks
    elif spec.strip() != LAST_STAGE:
        blocks = found.select([s.strip() for s in spec.split(",") if s.strip()])
    else:
        stages = paper_stages(found.blocks, found.paper_names)
        if not stages:
            raise AnalysisError(
                f"'{LAST_STAGE}' needs SE_<stage>_<block> names, which this model has not: name the blocks instead, "
                f"e.g. --ablate {','.join(found.blocks[-2:])}"
            )
        blocks = stages[max(stages)]
    check_removable(model, blocks)
    return blocks


def check_removable(model: nn.Module, blocks: Iterable[str]) -> None:
    """Refuse a block that :func:`remove_blocks` cannot take out: neither add_se's nor a known SE module.

    Raises:
        AnalysisError: the first such block, with its class.
    """
    stuck = _unremovable(model, blocks)
    if stuck:
        block = stuck[0]
        raise AnalysisError(
            f"--ablate cannot take out {block} ({type(model.get_submodule(block)).__name__}): the removal check "
            "knows the SE blocks of se_surgery.add_se and torchvision's and timm's SE modules; leave that block out "
            "of --ablate"
        )


def _unremovable(model: nn.Module, blocks: Iterable[str]) -> list[str]:
    from se_surgery import se_blocks

    ours = se_blocks(model)
    return [b for b in blocks if b not in ours and not is_known_se(model.get_submodule(b))]


def remove_blocks(model: nn.Module, blocks: Iterable[str]) -> nn.Module:
    """A copy of ``model`` without the SE blocks ``blocks``: add_se's taken out by :func:`se_surgery.remove_se`,
    torchvision's and timm's SE modules (each returns ``x * s``) replaced by an identity, so their owners compute ``x``.

    Raises:
        AnalysisError: a block that is neither (see :func:`check_removable`).
    """
    from se_surgery import remove_se, se_blocks

    blocks = list(blocks)
    check_removable(model, blocks)
    ours = se_blocks(model)
    mine = [b for b in blocks if b in ours]
    out = remove_se(model, mine) if mine else copy.deepcopy(model)
    for block in blocks:
        if block not in ours:
            out.set_submodule(block, nn.Identity())
    return out


def fix_gates(model: nn.Module, means: dict[str, np.ndarray], gates: Mapping[str, str] | None = None) -> nn.Module:
    """A copy of ``model`` whose gates of the blocks in ``means`` return those constant excitations.

    Args:
        gates: ``find_gates(model)`` where the caller has it already (the copy's modules have the same names).
    """
    fixed = copy.deepcopy(model)
    gates = find_gates(fixed) if gates is None else gates
    for block, value in means.items():
        like = next(fixed.get_submodule(block).parameters(), None)
        device = like.device if like is not None else None
        fixed.set_submodule(gates[block], ConstantGate(torch.as_tensor(value, dtype=torch.float64, device=device)))
    return fixed


def evaluate(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, desc: str = "eval", progress: bool = False
) -> tuple[float, float, int]:
    """Top-1 and top-5 accuracy in percent (top-k with k capped at the number of classes), and the image count."""
    device = next(model.parameters()).device
    correct = torch.zeros(2, dtype=torch.float64)
    total = 0
    with eval_mode(model), torch.no_grad():
        for images, labels in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            logits = model(images.to(device, non_blocking=True))
            correct += topk_correct(logits, labels.to(device)).cpu()
            total += len(labels)
    top1, top5 = (100.0 * float(c) / max(total, 1) for c in correct)
    return top1, top5, total


def ablate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    blocks: list[str],
    stats: ExcitationStats,
    *,
    found: SEGates | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Accuracy and parameters of the intact model, ``blocks`` removed, and ``blocks`` with fixed gates.

    Args:
        model: A model from :func:`se_surgery.add_se`, or a torchvision / timm SE network.
        loader: The evaluation data.
        blocks: SE module names to take out.
        stats: Captured statistics holding ``blocks`` (their all-class means fix the gates).
        found: ``SEGates.find(model)`` where the caller has it already.
        progress: tqdm bars.

    Returns:
        One row per variant: ``variant, blocks, top1, top5, images, params, se_overhead_pct`` (SE parameters as a
        percentage of the model without any SE, the paper's ~10% -> ~4%), ``params_saved``.

    Raises:
        AnalysisError: a block :func:`remove_blocks` cannot take out, or one that was not captured.
    """
    missing = [b for b in blocks if b not in stats.moments]
    if missing:
        raise AnalysisError(f"blocks {missing} were not captured: capture them too (drop --blocks) to fix their gates")
    gates = find_gates(model) if found is None else found.gates
    stuck = set(_unremovable(model, gates))
    base = remove_blocks(model, [b for b in gates if b not in stuck])  # the SE overhead of the blocks it can remove
    removed = remove_blocks(model, blocks)
    fixed = fix_gates(model, {b: stats.mean(b) for b in blocks}, gates)
    base_params, intact_params, removed_params = (count_parameters(m) for m in (base, model, removed))
    names = ",".join(stats.paper_name(b) for b in blocks)
    rows = []
    for variant, net, params in [("intact", model, intact_params), ("removed", removed, removed_params),
                                 ("fixed", fixed, removed_params)]:
        top1, top5, n = evaluate(net, loader, desc=variant, progress=progress)
        rows.append({
            "variant": variant,
            "blocks": "" if variant == "intact" else names,
            "top1": top1,
            "top5": top5,
            "images": n,
            "params": params,
            "se_overhead_pct": 100.0 * (params - base_params) / base_params,
            "params_saved": intact_params - params,
        })
    return pd.DataFrame(rows)
