"""The SENet paper's facts in one place: its block names, its tables' numbers and its study protocol.

Hu, Shen, Albanie, Sun, Wu, "Squeeze-and-Excitation Networks", TPAMI 2019 (arXiv:1709.01507). Everything here is
data read from the paper, plus the ``SE_<stage>_<block>`` name grammar of its Sec. 7.2 (conv2_x is stage 2, so
``layer4.1`` of a torchvision ResNet is ``SE_5_2``). The surgery, the trainer and the analysis read it from here.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

__all__ = [
    "PaperName", "format_paper_name", "parse_paper_name", "paper_stage",
    "TABLE2", "TABLE3", "TABLE_UNITS", "ReportedCost", "Reported", "AblationTable", "RESNET50", "SE_RESNET50",
    "ABLATIONS", "COST_TABLES",
    "PER_CLASS", "CHANNELS",
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


# ---- Table 2 and the ResNet-50 ablations (r = 16 unless varied) ------------------------------------------------------



class Reported(NamedTuple):
    """What one of the paper's tables reports for a ResNet-50 variant on ImageNet; ``None`` where it gives nothing."""

    params_m: float | None = None
    gflops: float | None = None  # multiply-adds of one 224 x 224 image
    top1_err: float | None = None  # single-crop top-1 error (%)


class AblationTable(NamedTuple):
    """One ablation table: its title, and per variant (named as ``python -m analysis.ablations --variants`` takes
    it) what the paper reports."""

    title: str
    rows: dict[str, Reported]


RESNET50 = Reported(25.6, 3.86)
"""ResNet-50 without SE, the baseline of every ablation (Tables 13 and 16). It has no top-1 error here: Table 2's
24.80 comes from the main results' training, not from the bias-free ablation runs of Tables 10-16."""

SE_RESNET50 = Reported(28.1, 3.87, 22.28)
"""The standard SE-ResNet-50 of the ablations (r = 16, SE on every block's residual branch)."""


class ReportedCost(NamedTuple):
    """One row of Table 2 or 3: a network and its SE version (r = 16), as the paper reports them."""

    flops: tuple[float, float]  # multiply-adds of one image, original -> SE, in the table's unit (``TABLE_UNITS``)
    params_m: tuple[float, float] | None = None  # parameters (M), original -> SE, where the paper gives them


TABLE2: dict[str, ReportedCost] = {
    "ResNet-50": ReportedCost((RESNET50.gflops, SE_RESNET50.gflops), (RESNET50.params_m, SE_RESNET50.params_m)),
    "ResNet-101": ReportedCost((7.58, 7.60), (44.5, 49.3)),
    "ResNet-152": ReportedCost((11.30, 11.32), (60.2, 66.8)),
    "ResNeXt-50": ReportedCost((4.24, 4.25)),
    "ResNeXt-101": ReportedCost((7.99, 8.00)),
    "VGG-16": ReportedCost((15.47, 15.48)),
    "BN-Inception": ReportedCost((2.03, 2.04)),
    "Inception-ResNet-v2": ReportedCost((11.75, 11.76)),
}
"""Table 2: GFLOPs (multiply-adds, 224 x 224; Inception-ResNet-v2 299 x 299) of each network and its SE version,
r = 16, and their parameters (M) where given. ResNeXt is 32x4d."""

TABLE3: dict[str, ReportedCost] = {
    "MobileNet": ReportedCost((569, 572), (4.2, 4.7)),
    "ShuffleNet": ReportedCost((140, 142), (1.8, 2.4)),
}
"""Table 3: MFLOPs (multiply-adds, 224 x 224) and parameters (M) of the mobile networks and their SE versions
(MobileNet and ShuffleNet at width 1x)."""

TABLE_UNITS: dict[str, str] = {"Table 2": "G", "Table 3": "M"}
"""The unit of each cost table's FLOPs: giga for Table 2, mega for Table 3."""

_SE_TOP1 = Reported(top1_err=SE_RESNET50.top1_err)  # the standard SE in a table that gives only errors

ABLATIONS: dict[str, AblationTable] = {
    "reduction": AblationTable("Table 10: reduction ratio r", {
        f"r={r}": Reported(p) for r, p in ((2, 45.7), (4, 35.7), (8, 30.7), (16, SE_RESNET50.params_m), (32, 26.9))}),
    "squeeze": AblationTable("Table 11: squeeze operator", {"avg": _SE_TOP1, "max": Reported(top1_err=22.57)}),
    "excitation": AblationTable("Table 12: excitation operator", {
        "relu": Reported(top1_err=23.47), "tanh": Reported(top1_err=23.00), "sigmoid": _SE_TOP1}),
    "stage": AblationTable("Table 13: SE in one stage", {
        "SE stage 2": Reported(25.6), "SE stage 3": Reported(25.7), "SE stage 4": Reported(26.4),
        "SE all": Reported(SE_RESNET50.params_m)}),
    "integration": AblationTable("Table 14: integration strategy", {
        "SE": _SE_TOP1, "SE-PRE": Reported(top1_err=22.23), "SE-POST": Reported(top1_err=22.78),
        "SE-Identity": Reported(top1_err=22.20)}),
    "3x3": AblationTable("Table 15: SE on the 3x3 convolution", {
        "SE": SE_RESNET50._replace(gflops=None), "SE 3x3": Reported(25.8, None, 22.48)}),
    "nosqueeze": AblationTable("Table 16: NoSqueeze", {"NoSqueeze": Reported(28.1, 4.27, 22.93), "SE": SE_RESNET50}),
}
"""The ResNet-50 ablations (Tables 10-16), keyed as ``python -m analysis.ablations --table`` takes them. Each table
is also compared with :data:`RESNET50`, which its rows do not repeat."""

COST_TABLES: dict[str, dict[str, dict[str, Any] | None]] = {
    "reduction": {f"r={r}": {"reduction": r} for r in (2, 4, 8, 16, 32)},
    "stage": {f"SE stage {s}": {"where": [s]} for s in (2, 3, 4)},
    "3x3": {"SE 3x3": {"position": "3x3"}},
    "nosqueeze": {"ResNet-50": None, "NoSqueeze": {"squeeze": "none"}, "SE": {}},
}
"""The ablation rows whose costs :func:`se_surgery.surgery.cost.paper_tables` counts: per :data:`ABLATIONS` key, its
variants with the :func:`se_surgery.add_se` options that build each (``None``: the plain network, :data:`RESNET50`);
the paper's numbers are :data:`ABLATIONS`'. Counted with biased FC layers (Table 10's 28.1M at r = 16 is Table 2's);
without biases every count still rounds to the paper's."""

# ---- the excitation study's protocol (Sec. 7.2) -----------------------------------------------------------------

PER_CLASS = 50
"""Validation images per class in Fig. 6-7."""

CHANNELS = 50
"""Channels drawn per SE block for the figures."""
