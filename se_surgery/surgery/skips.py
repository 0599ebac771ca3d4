"""Why a place gets no SE: one :class:`SkipKind` per reason, so code tests the kind and people read the text; and
the owners torch.fx cannot trace or run (:class:`Untraceable`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import fx

from ..errors import SurgeryError

__all__ = ["SkipKind", "Skipped", "Untraceable"]


class SkipKind(enum.Enum):
    """The kinds of places a plan leaves without SE (the value is the short label its table prints)."""

    NOT_CHANNELS_FIRST = "tokens"  # a 3-D / 5-D sum whose branch ends in no convolution: transformer tokens
    NO_SHARED_INPUT = "no skip"  # the operands share no input
    TIE = "tie"  # both operands carry as many learned layers
    HEAVY_SKIP = "heavy skip"  # the lighter operand carries more than one learned layer
    INNER_SUM = "inner sum"  # a sum between channel splits (Res2Net), or inside another unit's branch
    GATED = "gated"  # the branch already holds an SE / attention gate
    CHANNELS_LAST = "channels-last"  # a token MLP over N x H x W x C
    HOLDS_SE = "holds SE"  # the owner already holds an SE from add_se
    NO_POSITION = "no position"  # the chosen position has no place in this unit (3x3, pre)
    NARROW = "narrow"  # fewer channels than r: C // r would be 0
    NOT_SELECTED = "not selected"  # left out by where=
    INNER_CONCAT = "inner concat"  # a concatenation inside another one of the same block (Inception-v3's InceptionE)
    NO_BRANCHES = "no branches"  # a concatenation without parallel learned branches (a class token, an input transform)
    OTHER_PATHS = "other paths"  # the block's class computes it in another method too (timm's forward_with_tap)
    OUTSIDE_UNITS = "outside units"  # a plain conv outside a network's depthwise separable units (MobileNet's stem)
    CONTAINER = "container"  # the SE would have to go into an nn.Sequential / ModuleList / ModuleDict's own forward


@dataclass(frozen=True)
class Skipped:
    """A same-shape tensor sum that gets no SE: its node, the kind of reason, and the reason in words."""

    add: fx.Node
    kind: SkipKind
    reason: str


@dataclass(frozen=True)
class Untraceable:
    """An owner torch.fx cannot trace or run, left as it is; ``error`` says why and the way out."""

    owner: str
    class_name: str
    error: SurgeryError
