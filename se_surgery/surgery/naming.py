"""Owner names -> the paper's ``SE_<stage>_<block>`` names (SENet Sec. 7.2; conv2_x is stage 2)."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from torch import nn

from ..paper import format_paper_name

__all__ = ["SE_LEAF", "se_children", "is_resnet_block", "se_name", "owner_of", "paper_names_for", "resolve_blocks"]

_RESNET_BLOCK = re.compile(r"(?:^|\.)layer(\d+)\.(\d+)$")  # torchvision and timm ResNet / ResNeXt / Wide ResNet
SE_LEAF = re.compile(r"se(?:_(\d+))?")  # the leaf name add_se registers an SE under


def se_name(owner: str, index: int) -> str:
    """Module name of the ``index``-th SE in ``owner``'s forward: ``<owner>.se``, ``<owner>.se_1``, ..."""
    leaf = "se" if index == 0 else f"se_{index}"
    return f"{owner}.{leaf}" if owner else leaf


def se_children(owner: nn.Module) -> set[str]:
    """Names of ``owner``'s direct children that add_se made (they carry its ``_se_surgery`` metadata)."""
    return {leaf for leaf, child in owner.named_children() if isinstance(child.__dict__.get("_se_surgery"), dict)}


def owner_of(name: str) -> tuple[str, int]:
    """Inverse of :func:`se_name`: ``"layer1.0.se_1"`` -> ``("layer1.0", 1)``."""
    owner, _, leaf = name.rpartition(".")
    match = SE_LEAF.fullmatch(leaf)
    if match is None:
        raise ValueError(f"{name!r} is not an SE module name (expected '<owner>.se' or '<owner>.se_<k>')")
    return owner, int(match.group(1) or 0)


def is_resnet_block(owner: str) -> bool:
    """Whether ``owner`` is a ResNet-style block name (``layer<k>.<i>``), which names exactly as the paper does."""
    return _RESNET_BLOCK.search(owner) is not None


def paper_names_for(owners: Iterable[str]) -> dict[str, str]:
    """Map block owners (in forward order) to ``SE_<stage>_<block>``.

    ResNet-style names (``layer<k>.<i>``) map exactly: ``layer1.2`` -> ``SE_2_3``, ``layer4.1`` -> ``SE_5_2``. Other
    models number their containers of residual blocks as stages 2, 3, ... in order, and blocks 1, 2, ... within
    each; a sum in the top-level forward is ``SE_top``.
    """
    owners = list(dict.fromkeys(owners))
    names, stages, blocks = {}, {}, {}
    for owner in owners:
        match = _RESNET_BLOCK.search(owner)
        if match:
            names[owner] = format_paper_name(int(match.group(1)) + 1, int(match.group(2)) + 1)
            continue
        if owner == "":
            names[owner] = "SE_top"
            continue
        parent = owner.rpartition(".")[0]
        stage = stages.setdefault(parent, len(stages) + 2)
        blocks[parent] = blocks.get(parent, 0) + 1
        names[owner] = format_paper_name(stage, blocks[parent])
    return names


def resolve_blocks(
    names: Iterable[str], blocks: Iterable[str], paper: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """SE module names or paper names (``"layer4.1.se"`` or ``"SE_5_2"``) -> module names, and the names that are
    neither.

    Args:
        names: What the user asked for, in order (duplicates are dropped).
        blocks: The valid SE module names.
        paper: SE module name -> paper name, for the blocks that have one.

    Returns:
        ``(chosen, unknown)``: the module names in the order asked, and the names that match no block.
    """
    valid = list(blocks)
    by_paper = {p: b for b, p in paper.items() if b in valid}
    chosen, unknown = [], []
    for name in dict.fromkeys(names):
        block = name if name in valid else by_paper.get(name)
        if block is None:
            unknown.append(name)
        elif block not in chosen:
            chosen.append(block)
    return chosen, unknown
