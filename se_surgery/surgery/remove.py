"""Which SE blocks a model holds (:func:`se_blocks`, :func:`paper_names`), and taking them out (:func:`remove_se`)."""

from __future__ import annotations

import copy
import operator
from typing import Iterable, Union

from torch import nn

from ..errors import SurgeryError
from ..paper import paper_stage
from .inputs import check_model
from .naming import SE_LEAF, resolve_blocks, se_children
from .subclass import calls, install_forward, none_arguments, restore
from .tracing import trace_module

__all__ = ["remove_se", "se_blocks", "paper_names"]

Names = Union[None, str, int, Iterable[Union[str, int]]]


def se_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The SE blocks that :func:`add_se` inserted (``SELayer`` or ``se_layer=`` modules), by name, in forward order.

    A block counts when it carries add_se's metadata, sits at ``<owner>.se`` / ``se_<k>``, and ``<owner>``'s
    generated forward calls it.
    """
    found = {}
    for name, module in model.named_modules():
        owner, _, leaf = name.rpartition(".")
        meta = module.__dict__.get("_se_surgery")
        if name and isinstance(meta, dict) and SE_LEAF.fullmatch(leaf) and leaf in calls(model.get_submodule(owner)):
            found[name] = module
    return dict(sorted(found.items(), key=lambda item: item[1]._se_surgery["order"]))


def paper_names(model: nn.Module) -> dict[str, str]:
    """Each SE block's paper name ``SE_<stage>_<block>``: ``layer1.2.se`` -> ``SE_2_3``, ``layer4.1.se`` -> ``SE_5_2``.

    Names are fixed when :func:`add_se` runs, over all the residual blocks (so ``where=`` does not renumber them);
    a second SE in the same block gets a suffix (``SE_2_3_2``).
    """
    return {name: block._se_surgery["paper_name"] for name, block in se_blocks(model).items()}


def _removal_names(names: Names, blocks: dict[str, nn.Module], paper: dict[str, str]) -> list[str]:
    """``remove_se``'s ``names`` as a list of module or paper names: one name alone, or a paper stage (``5``)
    expanded to its blocks, as ``add_se``'s ``where=`` reads an int."""
    items = [names] if isinstance(names, (str, int)) else names
    how = ("pass SE module names ('layer4.1.se'), paper names ('SE_5_2') or paper stages (5), alone or in a list, "
           "or None for all")
    try:
        items = list(items)
    except TypeError:
        raise SurgeryError(f"remove_se cannot read names={names!r} ({type(names).__name__}): {how}") from None
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise SurgeryError(f"remove_se cannot read the name {item!r} ({type(item).__name__}): {how}")
        if isinstance(item, str):
            out.append(item)
            continue
        stage = [b for b in blocks if paper_stage(paper.get(b, "")) == item]
        if not stage:
            stages = sorted({s for s in map(paper_stage, paper.values()) if s is not None})
            raise SurgeryError(
                f"stage {item} holds no SE block of this model: pass one of its stages {stages}, or names such as "
                + ", ".join(f"{n} ({paper[n]})" for n in list(blocks)[:2])
                if stages else f"stage {item}: this model's SE blocks have no paper stages; pass their names: "
                + ", ".join(blocks)
            )
        out += stage
    return out


def remove_se(model: nn.Module, names: Names = None, *, inplace: bool = False) -> nn.Module:
    """Take SE blocks out again (e.g. the last stage's, as in the paper's Sec. 7.2 check).

    Args:
        model: a model from :func:`add_se`; left untouched unless ``inplace``.
        names: SE module names (``"layer4.1.se"``), paper names (``"SE_5_2"``) or paper stages (``5``: every
            ``SE_5_*`` block, as ``add_se(where=[5])`` reads it), one alone or a list; None removes all, which gives
            back the original function bit for bit.

    Raises:
        SurgeryError: ``model`` is no eager ``nn.Module``, or a name that is not an SE block of ``model`` (the
            message lists them); ``model`` is then unchanged.

    Examples:
        >>> plain = remove_se(se_resnet50)
        >>> no_last_stage = remove_se(se_resnet50, 5)  # same as ["SE_5_1", "SE_5_2", "SE_5_3"]
    """
    check_model(model, "remove_se")
    target = model if inplace else copy.deepcopy(model)
    blocks, paper = se_blocks(target), paper_names(target)
    if names is None:
        chosen, unknown = list(blocks), []
    else:
        chosen, unknown = resolve_blocks(_removal_names(names, blocks, paper), blocks, paper)
    if unknown:
        raise SurgeryError(
            f"{unknown} are not SE blocks of this model; it has: "
            + ", ".join(f"{n} ({paper[n]})" for n in blocks) if blocks else
            f"{unknown}: this model has no SE block from add_se (remove_se takes out only what add_se put in)"
        )
    by_owner: dict[str, list[str]] = {}
    for name in chosen:
        owner, _, leaf = name.rpartition(".")
        by_owner.setdefault(owner, []).append(leaf)
    for owner, leaves in by_owner.items():
        _take_out(target.get_submodule(owner), owner, leaves)
    return target


def _take_out(module: nn.Module, owner: str, leaves: list[str]) -> None:
    """Remove the SE children ``leaves`` from owner ``module`` and from its generated forward."""
    # its generated forward, SE calls included, children as leaves
    graph = trace_module(module, owner, concrete_args=none_arguments(module))
    for leaf in leaves:
        (node,) = [n for n in graph.nodes if n.op == "call_module" and n.target == leaf]
        if len(node.args) > 1:  # fused: se(branch, skip, overwrite) -> branch + skip
            node.op, node.target, node.args = "call_function", operator.add, node.args[:2]
        else:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        replaced_none = getattr(module, leaf)._se_surgery["replaced_none"]
        delattr(module, leaf)
        if replaced_none:
            module.__dict__[leaf] = None  # timm blocks built without attention hold `se = None`: give it back
    if any(n.op == "call_module" and n.target in se_children(module) for n in graph.nodes):
        graph.lint()
        install_forward(module, graph)
    else:
        restore(module)  # no SE of ours left: the original forward, bit for bit
