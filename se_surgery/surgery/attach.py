"""Where the SE of a plain or multi-branch unit lives, and the paper names of such units.

An SE that follows a layer's output (:class:`~.concat.After`) attaches to the module that made it where it can:
that module (an activation, a DenseNet layer) becomes the **holder** of the SE, running its own forward and then
the SE, so an ``nn.Sequential`` such as VGG's ``features`` keeps its length, its indexing and its slicing, and no
base state_dict key moves. A module that runs more than once, cannot be traced, or a functional activation leaves
the SE in the forward that calls it, as for a residual unit; a container's forward (``nn.Sequential``,
``nn.ModuleList``, ``nn.ModuleDict``) cannot take one, and such a unit is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch
from torch import fx, nn

from ..errors import SurgeryError
from ..paper import format_paper_name
from .concat import After
from .residual import _shape
from .skips import SkipKind, Skipped
from .tracing import concrete_arguments, trace_module

__all__ = ["Site", "site_for", "resolution_names", "CONTAINERS"]

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Site:
    """An SE on ``after``'s output inside ``module``'s forward (``graph``), read by ``readers`` instead."""

    module: str
    graph: fx.Graph
    after: fx.Node
    readers: tuple[fx.Node, ...]
    unit: After


def _qualified(owner: str, target: str) -> str:
    return f"{owner}.{target}" if owner else target


def _holder(name: str, module: nn.Module, unit: After, call: tuple[tuple, dict],
            autowrap_functions: Sequence[Callable]) -> Site | None:
    """``module`` as the holder of ``unit``'s SE: its traced forward, the SE before its output; None if it cannot.
    ``call``: the arguments it was called with: an argument left at None is traced as None (as for an owner), and
    one that was a list of tensors (a DenseNet layer's features) is annotated so, as TorchScript needs (fx writes
    the original annotation, often ``Tensor``)."""
    args, kwargs = call
    nones = {k: v for k, v in concrete_arguments(module, args, kwargs).items() if v is None}
    try:
        graph = trace_module(module, name, autowrap_functions=autowrap_functions, concrete_args=nones)
    except SurgeryError:
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, args):
        if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            node.type = List[torch.Tensor]
    (output,) = [n for n in graph.nodes if n.op == "output"]
    value = output.args[0]
    if not isinstance(value, fx.Node) or value.op == "placeholder":
        return None
    return Site(name, graph, value, (output,), unit)


def site_for(owner: str, graph: fx.Graph, unit: After, modules: dict[str, nn.Module], calls: dict[str, int],
             leaves: set[str], inputs: dict[str, tuple[tuple, dict]], autowrap_functions: Sequence[Callable] = ()
             ) -> Site | Skipped:
    """Where ``unit``'s SE goes: in the module that made its tensor (a holder), else in ``owner``'s forward.
    ``calls`` and ``inputs``: each module's number of calls and first arguments, as the probe saw them."""
    node = unit.node
    if node.op == "call_module":
        name = _qualified(_qualified(owner, node.target), unit.inside) if unit.inside else _qualified(owner,
                                                                                                     node.target)
        module = modules.get(name)  # None for a module registered under another name first
        if module is not None and calls.get(name, 0) == 1 and name not in leaves and not isinstance(module, CONTAINERS):
            held = _holder(name, module, unit, inputs.get(name, ((), {})), autowrap_functions)
            if held is not None:
                return held
    if isinstance(modules[owner], CONTAINERS):
        return Skipped(node, SkipKind.CONTAINER,
                       f"its SE would go into {type(modules[owner]).__name__} {owner or '<top>'}'s own forward "
                       "(the layer before it runs more than once or cannot hold one), which would shift its indexing")
    return Site(owner, graph, node, tuple(node.users), unit)


def resolution_names(sites: list[Site]) -> dict[str, str]:
    """``SE_<stage>_<block>`` for the modules holding plain and multi-branch units, in forward order: a stage is a run
    of units at one spatial size (VGG-16's conv1_x ... conv5_x are stages 1 ... 5), its blocks numbered from 1."""
    names: dict[str, str] = {}
    stage, block, size = 0, 0, None
    for site in sites:
        if site.module in names:
            continue
        shape = _shape(site.unit.node)
        spatial = tuple(shape[2:]) if shape is not None else None
        if spatial != size:
            stage, block, size = stage + 1, 0, spatial
        block += 1
        names[site.module] = format_paper_name(stage, block)
    return names
