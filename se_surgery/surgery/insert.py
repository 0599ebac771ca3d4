"""Carry out a :class:`~.planning.Plan`: build each SE block, then insert it into its owner's graph and forward.

Only the owners whose own forward holds a unit are traced (children stay leaves); each then runs the edited graph's
code as a subclass of its own class (:mod:`.subclass`), so every module keeps its class, its methods and every
state_dict key; the SE parameters are the only new keys.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from .config import SELayerFactory
from .inputs import check_model
from .planning import WROTE_INTO, Plan, Unit, plan, structure
from .residual import Residual, _shape, layout_name
from .se_module import SELayer, check_shape_kept
from .subclass import install_forward

__all__ = ["add_se", "apply_plan"]

logger = logging.getLogger(__name__)


def add_se(model: nn.Module, reduction: int | None = None, *, inplace: bool = False, **arguments: Any) -> nn.Module:
    """Put an SE block at every residual sum of ``model``; by default SENet's "standard SE" on the branch.

    Each residual sum ``x + F(x)`` becomes ``x + SE(F(x))`` (for the default position), the SE being
    :class:`~.se_module.SELayer` (torchvision's ``SqueezeExcitation(C, C // r)``) placed after the branch's last norm
    and before any drop-path / layer-scale factor. It is registered at ``<owner>.se`` (``se_1``, ``se_2``... for
    further sums in the same module), ``<owner>`` being the module whose forward holds the sum, which keeps its
    class. Sums that are not residual (ties, 3-D tokens, branches already gated, inner sums of a block) are skipped,
    and so are owners fx cannot trace or run and units narrower than r: one logged warning names them, why, and the
    way out. ``se_surgery.plan`` takes the same arguments and shows what this would do.

    Args:
        model: any CNN (torchvision, timm, your own); left untouched unless ``inplace``.
        reduction: the reduction ratio r (default 16); the excitation's hidden width is C // r (Table 10).
        config: the SE to insert as an :class:`~.config.SEConfig`; ``reduction`` and ``options`` override its fields.
        where: which owners get an SE: a predicate on owner names, or a list of paper stages (``[4]`` for
            conv4_x only, Table 13), owner-name prefixes (``"layer3"``) or paper names (``"SE_5_2"``). None: all.
        leaf_modules: module names or types whose own forward is not traced (the way out when fx cannot trace
            one); their children are still searched.
        autowrap_functions: functions fx should record as calls rather than trace through.
        example_input: an input the model accepts, for shape propagation; default: shaped as the first convolution
            reads (``randn(2, C, 64, 64)`` for a 2-D CNN), retried at the size the model declares.
        inplace: modify ``model`` itself.
        strict: raise on the first owner fx cannot trace or run, or that is narrower than r, instead of skipping it.
        options: :class:`~.config.SEConfig` fields: ``position`` (``"standard"``, ``"pre"``, ``"post"``,
            ``"identity"``, ``"3x3"``; Fig. 5, Tables 14-15), ``squeeze`` (``"avg"``, ``"max"``, ``"none"``; Tables
            11, 16), ``excitation`` (``"sigmoid"``, ``"tanh"``, ``"relu"``; Table 12), ``bias``, ``init``
            (``"he"`` or ``"identity"``: gates start at 1), ``divisor`` (timm's rounding of C / r), ``fuse`` (the
            standard SE and its sum as one ``skip + u * s``, the Caffe SENet's Axpy layer; hooks on
            ``se.scale_activation`` still see s) and ``se_layer`` (any ``channels -> nn.Module`` keeping the shape,
            such as timm's ``EcaModule``).

    Returns:
        The SE model: every module keeps its class (an owner's class becomes a subclass of its original with
        the same name), methods and state_dict keys; the SE parameters are the only new keys.

    Raises:
        SurgeryError: ``model`` is no eager ``nn.Module`` instance (None, a name, the class, a ScriptModule), an
            ``example_input`` that is no tensor or that the model fails on, a bad option value, nothing left to gate
            (no residual sum, every one skipped, a ``where`` that selects nothing, a ``position`` that fits no
            selected block), an ``se_layer`` that changes the shape, or with ``strict`` any block skipped because fx
            cannot trace it or it is narrower than r. ``model`` is then unchanged.

    Examples:
        >>> se_resnet50 = add_se(torchvision.models.resnet50())
        >>> se_blocks(se_resnet50)["layer4.1.se"].fc1.out_channels
        128
        >>> se3x3 = add_se(torchvision.models.resnet50(), position="3x3", bias=False)  # Table 15's SE 3x3
    """
    check_model(model, "add_se")
    if not isinstance(inplace, bool):
        raise SurgeryError(f"inplace must be True or False; got {inplace!r}")
    return apply_plan(plan(model, reduction, **arguments), inplace=inplace)


def _signature() -> inspect.Signature:
    """add_se's signature as help() and editors show it: :func:`~.planning.plan`'s, with ``inplace`` before its
    ``**options`` (the arguments are written once, in plan)."""
    parameters = list(inspect.signature(plan).parameters.values())
    inplace = inspect.Parameter("inplace", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
    return inspect.signature(plan).replace(parameters=[*parameters[:-1], inplace, parameters[-1]],
                                           return_annotation="nn.Module")


add_se.__signature__ = _signature()


def apply_plan(planned: Plan, *, inplace: bool = False) -> nn.Module:
    """Build every SE block of ``planned``, then insert them: the SE model (``planned.model`` itself if ``inplace``,
    else a copy). A plan applies once.

    Raises:
        SurgeryError: the plan was applied already, ``inplace`` on a model whose modules changed since it was
            planned, or an ``se_layer`` module does not keep its input's shape; the model is then unchanged.

    Examples:
        >>> chosen = se_surgery.plan(model, where=[4, 5])
        >>> print(chosen)  # what will change  # doctest: +SKIP
        >>> se_model = apply_plan(chosen)
    """
    if not isinstance(planned, Plan):
        raise SurgeryError(f"apply_plan needs a Plan from se_surgery.plan(model); got {type(planned).__name__}")
    if planned._applied:
        raise SurgeryError("this Plan was applied already: make a new one with se_surgery.plan(model)")
    if inplace and structure(planned.model) != planned._structure:
        raise SurgeryError(
            f"the {type(planned.model).__name__} this Plan was made for has changed since (its modules differ, e.g. "
            "SE blocks were added): plan it again with se_surgery.plan(model)"
        )
    if inplace:
        target = planned.model
    else:
        target = planned._working if planned._working is not planned.model else copy.deepcopy(planned.model)
    modules = dict(target.named_modules())
    by_owner: dict[str, list[Unit]] = {}
    for unit in planned.units:
        by_owner.setdefault(unit.owner, []).append(unit)
    built = {owner: [(unit, _build(unit, k, planned, modules[owner])) for k, unit in enumerate(units)]
             for owner, units in by_owner.items()}
    for owner, inserts in built.items():  # nothing above touched the model; from here on nothing can fail
        _insert(modules[owner], planned._graphs[owner], inserts)
    planned._applied = True
    logger.info("add_se: %d SE block(s) with r=%d in %s", len(planned.units), planned.config.reduction,
                type(target).__name__)
    return target


def _build(unit: Unit, index: int, planned: Plan, owner: nn.Module) -> nn.Module:
    """The SE module of ``unit`` (its owner's ``index``-th), on the owner's device and dtype, with add_se's metadata."""
    config, like = planned.config, next(owner.parameters(), None)
    if config.se_layer is not None:
        rank = unit.placement.rank or len(_shape(unit.placement.after))
        se = _user_se(config.se_layer, unit.channels, like, unit.owner, rank)
        described = {"squeeze": None, "excitation": None, "bias": None,
                     "se_layer": getattr(config.se_layer, "__name__", repr(config.se_layer))}
    else:
        se = SELayer(unit.channels, unit.hidden, squeeze=config.squeeze, excitation=config.excitation,
                     bias=config.bias)
        se.reset_parameters(identity=config.init == "identity")
        if like is not None:
            se.to(device=like.device, dtype=like.dtype)
        described = {"squeeze": config.squeeze, "excitation": config.excitation, "bias": config.bias,
                     "se_layer": None}
    leaf = unit.se_name.rpartition(".")[2]
    se._se_surgery = {  # marks the blocks add_se made (remove_se never touches others), survives copies
        "paper_name": unit.paper_name,
        "order": (planned._order[unit.owner], index),  # forward order of the units
        "replaced_none": getattr(owner, leaf, 0) is None,
        "position": config.position,
        **described,
        "fused": unit.fused,
    }
    return se


def _user_se(factory: SELayerFactory, channels: int, like: torch.Tensor | None, owner: str, rank: int) -> nn.Module:
    block = owner or "the top-level sum"
    try:
        se = factory(channels)
    except Exception as err:
        raise SurgeryError(f"se_layer({channels}) failed for {block}: {err}") from err
    if not isinstance(se, nn.Module):
        raise SurgeryError(f"se_layer({channels}) must return an nn.Module, got {type(se).__name__} (for {block})")
    if like is not None:
        se.to(device=like.device, dtype=like.dtype)
    why = check_shape_kept(se, channels, like, dims=rank - 2)
    if why is not None:
        raise SurgeryError(
            f"se_layer({channels}) = {type(se).__name__} cannot go into {block}: {why}. An se_layer must map "
            f"{layout_name(rank)} to the same shape (a gated copy of its input), like timm's EcaModule or SEModule."
        )
    return se


def _insert(owner: nn.Module, graph: torch.fx.Graph, inserts: list[tuple[Unit, nn.Module]]) -> None:
    """Register each SE under its name and call it in ``graph`` where its unit says; the owner then runs it."""
    graph.owning_module = owner  # lint checks the SE targets against the owner itself
    for unit, se in inserts:
        leaf, p = unit.se_name.rpartition(".")[2], unit.placement
        owner.__dict__.pop(leaf, None)  # timm blocks hold `self.se = None` when built without attention
        owner.add_module(leaf, se)
        if unit.fused:
            _fuse(p.residual, leaf, owner)
            continue
        # after a placeholder (SE-PRE on the owner's input) the SE goes just before its first reader
        at = graph.inserting_before(p.readers[0]) if p.after.op == "placeholder" else graph.inserting_after(p.after)
        with at:
            node = graph.create_node("call_module", leaf, (p.after,))
        p.after.replace_all_uses_with(node, delete_user_cb=lambda user, readers=p.readers: user in readers)
    graph.lint()
    install_forward(owner, graph)


def _returns_new_tensor(module: nn.Module) -> bool:
    """Whether ``module`` returns a tensor of its own (a norm, convolution or linear layer, or a Sequential ending in
    one), not its input or a view of another tensor."""
    if isinstance(module, nn.Sequential):
        return len(module) > 0 and _returns_new_tensor(module[-1])
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.modules.conv._ConvNd,
                               nn.Linear))


def _fuse(unit: Residual, leaf: str, owner: nn.Module) -> None:
    """``branch + skip`` -> ``self.<leaf>(branch, skip, overwrite)``: the SE computes ``skip + branch * s`` in one pass.

    The add node itself becomes the SE call, so other placements that read the sum keep a valid node. ``overwrite``
    (the sum may be written into the branch tensor when autograd is off, as torchvision's ``out += identity`` does):
    the owner's own sum wrote into it, or nothing but the sum reads it and it is the fresh output of a norm / conv.
    """
    add, branch = unit.add, unit.branch
    overwrite = add.meta.get(WROTE_INTO) is branch or (
        len(branch.users) == 1
        and branch.op == "call_module"
        and _returns_new_tensor(owner.get_submodule(branch.target))
    )
    add.op, add.target = "call_module", leaf
    add.args, add.kwargs = (unit.branch, unit.skip, overwrite), {}
