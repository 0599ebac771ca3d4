"""The SENet paper's facts in one place: its block names, its tables' numbers and its study protocol.

Hu, Shen, Albanie, Sun, Wu, "Squeeze-and-Excitation Networks", TPAMI 2019 (arXiv:1709.01507). Everything here is
data read from the paper, plus the ``SE_<stage>_<block>`` name grammar of its Sec. 7.2 (conv2_x is stage 2, so
``layer4.1`` of a torchvision ResNet is ``SE_5_2``). The surgery, the trainer and the analysis read it from here.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "PaperName", "format_paper_name", "parse_paper_name", "paper_stage",
    "TABLE2", "COST_TABLES", "PER_CLASS", "CHANNELS",
]

# ---- the name grammar (Sec. 7.2, Fig. 6-7) ----------------------------------------------------------------------

_NAME = re.compile(r"SE_(\d+)_(\d+)(?:_(\d+))?")


class PaperName(NamedTuple):
    """``SE_<stage>_<block>[_<k>]``: the k-th SE (from 2 on) of one block; k is 1 for a block's first SE."""

    stage: int
    block: int
    k: int = 1


def format_paper_name(stage: int, block: int, k: int = 1) -> str:
    """``(5, 2)`` -> ``"SE_5_2"``; a block's second SE is ``"SE_5_2_2"``."""
    return f"SE_{stage}_{block}" + (f"_{k}" if k > 1 else "")


def parse_paper_name(name: str) -> PaperName | None:
    """``"SE_5_2"`` -> ``PaperName(5, 2, 1)``; None for a name outside the grammar (``"SE_top"``, ``"layer4.1.se"``)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return PaperName(int(match[1]), int(match[2]), int(match[3] or 1))


def paper_stage(name: str) -> int | None:
    """The stage of a paper name (``"SE_5_2"`` -> 5), None outside the grammar."""
    parsed = parse_paper_name(name)
    return None if parsed is None else parsed.stage


# ---- costs (Table 2 and the ResNet-50 ablations, r = 16) ----------------------------------------------------------

TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "resnet50": {"params": (25.6, 28.1), "gmacs": (3.86, 3.87)},
    "resnet101": {"params": (44.5, 49.3), "gmacs": (7.58, 7.60)},
    "resnet152": {"params": (60.2, 66.8), "gmacs": (11.30, 11.32)},
}
"""Table 2: parameters (M) and GFLOPs (multiply-adds) of the base network and its SE version, r = 16."""

COST_TABLES: dict[str, list[tuple[str, dict | None, float, float | None]]] = {
    "Table 10: reduction ratio r": [(f"r = {r}", {"reduction": r}, p, None) for r, p in
                                    ((2, 45.7), (4, 35.7), (8, 30.7), (16, 28.1), (32, 26.9))],
    "Table 13: SE in one stage": [(f"stage {s} only", {"where": [s]}, p, None)
                                  for s, p in ((2, 25.6), (3, 25.7), (4, 26.4))],
    "Table 15: SE 3x3": [("SE 3x3", {"position": "3x3"}, 25.8, None)],
    "Table 16: NoSqueeze": [("ResNet-50", None, 25.6, 3.86), ("NoSqueeze", {"squeeze": "none"}, 28.1, 4.27),
                            ("SE", {}, 28.1, 3.87)],
}
"""The ResNet-50 ablations' costs: per table, rows of (label, add_se options or None for the plain network, the
paper's parameters (M), its GFLOPs where the table gives them). Counted with biased FC layers (Table 10's 28.1M at
r = 16 is Table 2's); without biases every count still rounds to the paper's."""

# ---- the excitation study's protocol (Sec. 7.2) -----------------------------------------------------------------

PER_CLASS = 50
"""Validation images per class in Fig. 6-7."""

CHANNELS = 50
"""Channels drawn per SE block for the figures."""
