"""The fx pass: find every residual sum, put a torchvision ``SqueezeExcitation`` on its branch, or take it out again.

Only the blocks whose own forward holds a sum are traced (children stay leaves) and swapped for GraphModules, so the
outer model keeps its class, its methods and every state_dict key; the SE parameters are the only new keys.
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Callable, Iterable, Literal, Sequence, Union

import torch
from torch import fx, nn
from torchvision.ops import SqueezeExcitation

from ..errors import SurgeryError
from .naming import SE_LEAF, paper_names_for, resolve_blocks, se_name
from .probe import probe_sums
from .residual import Residual, Skipped, classify_sum, find_sums
from .tracing import build_graph_module, propagate_shapes, trace_module

__all__ = ["add_se", "remove_se", "se_blocks", "paper_names"]

logger = logging.getLogger(__name__)

Where = Union[None, Callable[[str], bool], Iterable[Union[int, str]]]
# sigmoid(10) = 0.99995: the gates start at 1 to within 5e-5, so a pretrained network's outputs barely move. The
# price: sigmoid' is 4.5e-5 there and fc2 starts at zero, so the gates leave 1 slowly; a smaller bias (6-7) would
# learn faster but changes a deep network's outputs by more than 1e-3 at the start.
_IDENTITY_BIAS = 10.0


def _example_for(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input
    ref = next(model.parameters(), None)
    ref = ref if ref is not None else next(model.buffers(), torch.empty(0))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    # Batch 2 so a broadcast over the batch dimension never looks like a same-shape sum; 64 px keeps the probe cheap.
    return torch.randn(2, channels, 64, 64, device=ref.device, dtype=dtype)


def _leaf_names(model: nn.Module, leaf_modules: Sequence[str | type]) -> set[str]:
    names = {n for n in leaf_modules if isinstance(n, str)}
    types = tuple(t for t in leaf_modules if isinstance(t, type))
    known = dict(model.named_modules())
    unknown = sorted(n for n in names if n not in known)
    if unknown:
        raise SurgeryError(f"leaf_modules names {unknown} are not modules of {type(model).__name__}")
    return names | {n for n, m in known.items() if types and isinstance(m, types)}


def _where_filter(where: Where, paper: dict[str, str]) -> Callable[[str], bool]:
    if where is None:
        return lambda owner: True
    if callable(where):
        return where
    items = [where] if isinstance(where, (str, int)) else list(where)
    stages = {int(paper[o].split("_")[1]) if paper[o].count("_") >= 2 else None for o in paper}

    def matches(item: int | str, owner: str) -> bool:
        if isinstance(item, int):
            return paper[owner].startswith(f"SE_{item}_")
        return owner == item or owner.startswith(item + ".") or paper[owner] == item

    for item in items:
        if not any(matches(item, o) for o in paper):
            raise SurgeryError(
                f"where= item {item!r} matches no residual block. Blocks: "
                + ", ".join(f"{o or '<top>'} ({p})" for o, p in paper.items())
                + f"; stages: {sorted(s for s in stages if s is not None)}"
            )
    return lambda owner: any(matches(item, owner) for item in items)


def _make_se(channels: int, reduction: int, init: str, like: torch.Tensor | None, where: str) -> SqueezeExcitation:
    hidden = channels // reduction
    if hidden < 1:
        raise SurgeryError(
            f"reduction={reduction} is larger than the {channels} channels of {where or 'the top-level sum'}: "
            f"the excitation's hidden layer C // r would be empty. Use reduction <= {channels}, or leave that block "
            f"out with where=lambda owner: owner != {where!r}."
        )
    se = SqueezeExcitation(channels, hidden)  # z = avgpool(u); s = sigmoid(fc2(relu(fc1(z)))); out = s * u
    for fc in (se.fc1, se.fc2):
        nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")  # He et al. 2015, as the paper trains from scratch
        nn.init.zeros_(fc.bias)
    if init == "identity":
        nn.init.zeros_(se.fc2.weight)
        nn.init.constant_(se.fc2.bias, _IDENTITY_BIAS)
    if like is not None:
        se.to(device=like.device, dtype=like.dtype)
    return se


def _grouped(skipped: list[tuple[str, Skipped]]) -> str:
    by_reason: dict[str, list[str]] = {}
    for owner, skip in skipped:
        by_reason.setdefault(skip.reason, []).append(owner or "<top>")
    parts = []
    for reason, owners in by_reason.items():
        shown = ", ".join(owners[:4]) + (f" and {len(owners) - 4} more" if len(owners) > 4 else "")
        parts.append(f"{len(owners)} sum(s) where {reason} ({shown})")
    return "; ".join(parts)


def add_se(
    model: nn.Module,
    reduction: int = 16,
    *,
    where: Where = None,
    init: Literal["he", "identity"] = "he",
    leaf_modules: Sequence[str | type] = (),
    autowrap_functions: Sequence[Callable] = (),
    example_input: torch.Tensor | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Put an SE block on the branch of every residual sum of ``model`` (SENet's "standard SE" position).

    Each residual sum ``x + F(x)`` becomes ``x + SE(F(x))``, the SE being ``torchvision.ops.SqueezeExcitation(C, C // r)``
    placed after the branch's last norm and before any drop-path / layer-scale factor. It is registered at
    ``<owner>.se`` (``se_1``, ``se_2``... for further sums in the same module), ``<owner>`` being the module whose
    forward holds the sum. Sums that are not residual (ties, 3-D tokens, branches already gated) are skipped with a
    logged warning.

    Args:
        model: any CNN (torchvision, timm, your own); left untouched unless ``inplace``.
        reduction: the reduction ratio r; the excitation's hidden width is C // r.
        where: which blocks get an SE: a predicate on owner names, or a list of paper stages (``[4]`` for
            conv4_x only), owner-name prefixes (``"layer3"``) or paper names (``"SE_5_2"``). None: all of them.
        init: ``"he"`` (the paper's He initialisation) or ``"identity"`` (gates start at 1, so a pretrained
            network's outputs are unchanged when fine-tuning starts).
        leaf_modules: module names or types whose own forward is not traced (the way out when fx cannot trace
            one); their children are still searched.
        autowrap_functions: functions fx should record as calls rather than trace through.
        example_input: an input the model accepts, for shape propagation; default ``randn(2, 3, 64, 64)``.
        inplace: modify ``model`` itself (a top-level sum still makes a new root: use the return value).

    Returns:
        The SE model: same class, methods and state_dict keys, plus the SE parameters (unless the top-level forward
        holds a sum, which makes the root a ``GraphModule``).

    Raises:
        SurgeryError: bad ``reduction``/``init``, a block fx cannot trace, no residual sum at all, or a ``where``
            that selects nothing. ``model`` is then unchanged.

    Examples:
        >>> se_resnet50 = add_se(torchvision.models.resnet50())
        >>> se_blocks(se_resnet50)["layer4.1.se"].fc1.out_channels
        128
    """
    if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
        raise SurgeryError(f"reduction must be an integer >= 1 (the paper's r, default 16); got {reduction!r}")
    if init not in ("he", "identity"):
        raise SurgeryError(f"init must be 'he' or 'identity'; got {init!r}")
    leaves = _leaf_names(model, leaf_modules)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    probe = probe_sums(target, _example_for(target, example_input))

    plans: dict[str, tuple[fx.Graph, list[Residual]]] = {}
    skipped: list[tuple[str, Skipped]] = []
    for owner in probe.owners:
        if owner in leaves:
            continue
        module = modules[owner]
        graph = trace_module(module, owner, autowrap_functions=autowrap_functions)
        propagate_shapes(module, graph, owner, *probe.inputs[owner])
        order = {node: i for i, node in enumerate(graph.nodes)}
        submodules = dict(module.named_modules())
        found = []
        for add, a, b in find_sums(graph):
            verdict = classify_sum(add, a, b, submodules, order)
            (found if isinstance(verdict, Residual) else skipped).append(
                verdict if isinstance(verdict, Residual) else (owner, verdict)
            )
        if found:
            plans[owner] = (graph, found)
    if skipped:
        logger.warning("add_se skipped %s", _grouped(skipped))
    if not plans:
        if skipped:
            raise SurgeryError(
                f"no residual sum of {type(model).__name__} can take an SE: {_grouped(skipped)}. A model whose blocks "
                "are already gated (add_se applied twice, EfficientNet, RegNetY, SE-ResNet) needs none; for the "
                "plain version, start from the model without attention (e.g. regnet_x instead of regnet_y)."
            )
        raise SurgeryError(
            f"found no residual sum in {type(model).__name__}: no module adds two same-shape tensors. add_se works "
            "on residual networks (x + F(x)); plain stacks such as VGG and concatenating ones such as DenseNet have "
            "none. If a block was listed in leaf_modules=, drop it from there; where= only chooses among residual "
            "blocks, so it cannot create one."
        )
    paper = paper_names_for(plans)
    keep = _where_filter(where, paper)
    plans = {owner: plan for owner, plan in plans.items() if keep(owner)}
    if not plans:
        raise SurgeryError(
            f"where={where!r} excluded every residual block; candidates: "
            + ", ".join(f"{o or '<top>'} ({p})" for o, p in paper.items())
        )

    blocks: dict[str, list[tuple[Residual, str, SqueezeExcitation]]] = {}
    for owner, (graph, found) in plans.items():
        like = next(modules[owner].parameters(), None)
        names = _free_se_names(modules[owner], owner, len(found))
        blocks[owner] = []
        for k, (r, name) in enumerate(zip(found, names)):
            se = _make_se(r.channels, reduction, init, like, owner)
            se._se_surgery = {  # marks the blocks add_se made (remove_se never touches others), survives copies
                "paper_name": paper[owner] + (f"_{k + 1}" if k else ""),
                "order": (probe.owners.index(owner), k),  # forward order of the sums
                "replaced_none": getattr(modules[owner], name.rpartition(".")[2], 0) is None,
            }
            blocks[owner].append((r, name, se))

    for owner in sorted(plans, key=lambda o: -o.count(".") - (o != "")):  # innermost first, root last
        gm = build_graph_module(modules[owner], plans[owner][0])
        for residual, name, se in blocks[owner]:
            _make_out_of_place(gm.graph, residual.add)
            leaf = name.rpartition(".")[2]
            gm.__dict__.pop(leaf, None)  # timm blocks hold `self.se = None` when built without attention
            gm.add_submodule(leaf, se)
            with gm.graph.inserting_after(residual.insert_after):
                node = gm.graph.call_module(leaf, (residual.insert_after,))
            residual.insert_after.replace_all_uses_with(node, delete_user_cb=lambda user, c=residual.consumer: user is c)
        gm.graph.lint()
        gm.recompile()
        if owner == "":
            target = gm
        else:
            parent, _, child = owner.rpartition(".")
            setattr(target.get_submodule(parent), child, gm)
    logger.info("add_se: %d SE block(s) with r=%d in %s", sum(map(len, blocks.values())), reduction, type(model).__name__)
    return target


def _make_out_of_place(graph: fx.Graph, add: fx.Node) -> None:
    """``out.add_(x)`` / ``out += x`` -> ``s = out + x``, later readers of ``out`` reading ``s``.

    An in-place sum mutates its first operand; once the SE scales the branch, that operand is no longer the tensor
    later nodes read, so the mutation is made explicit in the graph (same values, in the same order).
    """
    in_place = (add.op == "call_method" and add.target in ("add_", "__iadd__")) or (
        add.op == "call_function" and add.target is operator.iadd
    )
    if not in_place:
        return
    mutated = add.args[0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    add.target = "add" if add.op == "call_method" else operator.add
    for user in [u for u in mutated.users if order[u] > order[add]]:
        user.replace_input_with(mutated, add)


def _free_se_names(module: nn.Module, owner: str, count: int) -> list[str]:
    names, index = [], 0
    while len(names) < count:
        leaf = se_name("", index)
        taken = getattr(module, leaf, None) is not None
        if not taken:
            names.append(se_name(owner, index))
        index += 1
    return names


def se_blocks(model: nn.Module) -> dict[str, SqueezeExcitation]:
    """The SE blocks that :func:`add_se` inserted, by module name, in forward order."""
    found = {}
    for name, module in model.named_modules():
        owner, _, leaf = name.rpartition(".")
        if isinstance(module, SqueezeExcitation) and hasattr(module, "_se_surgery") and SE_LEAF.fullmatch(leaf):
            parent = model.get_submodule(owner)
            if isinstance(parent, fx.GraphModule) and any(
                n.op == "call_module" and n.target == leaf for n in parent.graph.nodes
            ):
                found[name] = module
    return dict(sorted(found.items(), key=lambda item: item[1]._se_surgery["order"]))


def paper_names(model: nn.Module) -> dict[str, str]:
    """Each SE block's paper name ``SE_<stage>_<block>``: ``layer1.2.se`` -> ``SE_2_3``, ``layer4.1.se`` -> ``SE_5_2``.

    Names are fixed when :func:`add_se` runs, over all the residual blocks (so ``where=`` does not renumber them);
    a second SE in the same block gets a suffix (``SE_2_3_2``).
    """
    return {name: block._se_surgery["paper_name"] for name, block in se_blocks(model).items()}


def remove_se(model: nn.Module, names: Iterable[str] | None = None, *, inplace: bool = False) -> nn.Module:
    """Take SE blocks out again (e.g. the last stage's, as in the paper's Sec. 7.2 check).

    Args:
        model: a model from :func:`add_se`; left untouched unless ``inplace``.
        names: SE module names (``"layer4.1.se"``) or paper names (``"SE_5_2"``); None removes all, which gives
            back the original function bit for bit.

    Raises:
        SurgeryError: a name that is not an SE block of ``model`` (the message lists them).
    """
    target = model if inplace else copy.deepcopy(model)
    blocks, paper = se_blocks(target), paper_names(target)
    chosen, unknown = (list(blocks), []) if names is None else resolve_blocks(names, blocks, paper)
    if unknown:
        raise SurgeryError(
            f"{unknown} are not SE blocks of this model; it has: "
            + ", ".join(f"{n} ({paper[n]})" for n in blocks) if blocks else f"{unknown}: this model has no SE block"
        )
    touched: dict[str, fx.GraphModule] = {}
    for name in chosen:
        owner, _, leaf = name.rpartition(".")
        gm = target.get_submodule(owner)
        (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == leaf]
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        gm.delete_submodule(leaf)
        if blocks[name]._se_surgery["replaced_none"]:
            gm.__dict__[leaf] = None  # timm blocks built without attention hold `se = None`: give it back
        touched[owner] = gm
    for gm in touched.values():
        gm.graph.lint()
        gm.recompile()
    return target
