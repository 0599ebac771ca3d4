"""Where the SE block goes in a residual unit: the integration strategies of SENet Fig. 5 and Tables 14-15.

Each position turns a :class:`~.residual.Residual` into a :class:`Placement`: the node whose output the SE scales, and
the nodes that read the scaled tensor instead. Pure: the graph is not changed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layer_types import LayerKind, is_layer
from .residual import Residual, _shape, layout_name, learned_layers
from .skips import SkipKind, Skipped

__all__ = ["POSITIONS", "Position", "Placement", "place"]

Position = Literal["standard", "pre", "post", "identity", "3x3"]
POSITIONS: tuple[str, ...] = ("standard", "pre", "post", "identity", "3x3")

_ACTIVATION_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.mish,
                         F.leaky_relu, F.elu}
_ACTIVATION_METHODS = {"relu", "relu_"}


@dataclass(frozen=True)
class Placement:
    """The SE scales ``after``'s output (``channels`` wide) for ``readers``, which read the SE output instead."""

    residual: Residual
    after: fx.Node
    readers: tuple[fx.Node, ...]
    channels: int
    rank: int | None = None  # the scaled tensor's rank where ``after`` carries no shape (a holder's own graph)


def _module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules[node.target] if node.op == "call_module" else None


def is_activation_module(module: nn.Module) -> bool:
    """A torch.nn activation, or a registered activation type holding no learned layer."""
    return type(module).__module__ == "torch.nn.modules.activation" or bool(
        is_layer(module, LayerKind.ACTIVATION) and learned_layers(module) == 0
    )


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    module = _module(node, modules)
    if module is not None:
        return is_activation_module(module)
    return (node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ACTIVATION_METHODS
    )


def _is_norm_or_pass_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    module = _module(node, modules)
    if module is None or learned_layers(module):
        return False
    no_params = next(module.parameters(), None) is None
    return is_layer(module, LayerKind.NORM) or (is_layer(module, LayerKind.PASS_THROUGH) and no_params)


def _spatial_conv(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A module holding exactly one learned layer, a convolution with a kernel larger than 1 (with its norm/act)."""
    module = _module(node, modules)
    if module is None or learned_layers(module) != 1:
        return False
    conv = next((m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return conv is not None and any(k > 1 for k in conv.kernel_size)


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _after_3x3(unit: Residual, modules: dict[str, nn.Module], order: dict[fx.Node, int]) -> fx.Node | Skipped:
    nodes = sorted(unit.path, key=order.__getitem__)
    learned = [i for i, n in enumerate(nodes) if (m := _module(n, modules)) is not None and learned_layers(m)]
    inner = [i for i, n in enumerate(nodes) if _spatial_conv(n, modules) and learned and learned[-1] > i]
    if not inner:
        return Skipped(
            unit.add,
            SkipKind.NO_POSITION,
            "position='3x3' needs a spatial convolution (kernel > 1) inside the branch with more layers after it, "
            "and this branch has none the SE can go after (its convolutions are 1x1, or inside one module)",
        )
    node = nodes[inner[-1]]
    while (user := _sole_user(node)) is not None and user in unit.path:  # the conv's norm, drop-block, activation
        if _is_activation(user, modules):
            return user
        if not _is_norm_or_pass_through(user, modules):
            break
        node = user
    return node


def place(
    unit: Residual, position: Position, modules: dict[str, nn.Module], order: dict[fx.Node, int]
) -> Placement | Skipped:
    """Where the SE of residual unit ``unit`` goes for ``position`` (SENet Fig. 5 and Sec. 6.5).

    - ``"standard"``: on the branch after its last norm, before drop-path / layer-scale and the sum (Fig. 5b);
    - ``"pre"`` (SE-PRE): on the unit's input at the start of the branch; the skip takes the input unchanged;
    - ``"post"`` (SE-POST): after the sum, and after the non-linearity that follows it where there is one;
    - ``"identity"`` (SE-Identity): on the skip operand of the sum, in parallel to the branch;
    - ``"3x3"`` (SE 3x3, Table 15): after the branch's spatial convolution and its norm and activation.

    Args:
        modules: the owner's ``named_modules()``; order: each node's position in the graph.
    """
    if position == "standard":
        return Placement(unit, unit.insert_after, (unit.consumer,), unit.channels)
    if position == "identity":
        return Placement(unit, unit.skip, (unit.add,), unit.channels)
    if position == "post":
        after = unit.add
        user = _sole_user(after)
        if user is not None and _is_activation(user, modules):
            after = user
        return Placement(unit, after, tuple(after.users), unit.channels)
    if position == "pre":
        shape, rank = _shape(unit.root), len(_shape(unit.branch))  # the sum's rank
        if shape is None or len(shape) != rank:
            return Skipped(unit.add, SkipKind.NO_POSITION,
                           f"position='pre' needs the block's input to be one {layout_name(rank)} tensor")
        return Placement(unit, unit.root, tuple(u for u in unit.root.users if u in unit.path), int(shape[1]))
    after = _after_3x3(unit, modules, order)
    if isinstance(after, Skipped):
        return after
    return Placement(unit, after, tuple(after.users), int(_shape(after)[1]))
