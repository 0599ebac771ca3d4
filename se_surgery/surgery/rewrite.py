"""The fx pass: find every residual sum, put an SE block where the chosen position says, or take it out again.

Only the blocks whose own forward holds a sum are traced (children stay leaves); each such block then runs the
edited graph's code as a subclass of its own class (:mod:`.rewritten`), so every module keeps its class, its
methods and every state_dict key; the SE parameters are the only new keys.
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any, Callable, Iterable, Literal, Sequence, Union

import torch
from torch import fx, nn

from ..errors import SurgeryError
from .naming import SE_LEAF, paper_names_for, resolve_blocks, se_name
from .positions import POSITIONS, Placement, Position, place
from .probe import input_channels, probe_sums
from .residual import Residual, Skipped, residual_units
from .rewritten import calls, is_rewritten, restore, rewrite
from .se_module import EXCITATIONS, SQUEEZES, Excitation, SELayer, Squeeze, check_shape_kept
from .tracing import concrete_arguments, propagate_shapes, trace_module

__all__ = ["add_se", "remove_se", "se_blocks", "paper_names"]

logger = logging.getLogger(__name__)

Where = Union[None, Callable[[str], bool], Iterable[Union[int, str]]]
SELayerFactory = Callable[[int], nn.Module]
Names = Union[None, str, int, Iterable[Union[str, int]]]


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_model(model: Any, fn: str) -> None:
    """Refuse, in one line, anything but an eager ``nn.Module`` instance (None, a name, the class, a ScriptModule)."""
    example = "add_se(torchvision.models.resnet18())" if fn == "add_se" else "remove_se(add_se(model))"
    if isinstance(model, torch.jit.ScriptModule):
        raise SurgeryError(
            f"{fn} got a TorchScript module ({type(model).__name__}), which torch.fx cannot trace: call {fn} on the "
            f"eager model, then script the result, e.g. torch.jit.script({fn}(model))"
        )
    if isinstance(model, nn.Module):
        return
    if isinstance(model, type) and issubclass(model, nn.Module):
        got = f"the class {model.__name__}: build it first"
    elif isinstance(model, str):
        got = f"the string {model!r}: build the model first"
        if fn == "add_se":
            example = f"add_se(torchvision.models.get_model({model!r}))"
    else:
        got = f"{type(model).__name__} {_brief(model)}" if model is not None else "None"
        got += ": pass the model itself"
    raise SurgeryError(f"{fn} needs an nn.Module instance, got {got}, e.g. {example}")


def _check_example(example_input: Any, model: nn.Module) -> None:
    if example_input is None or isinstance(example_input, torch.Tensor):
        return
    raise SurgeryError(
        f"example_input must be a torch.Tensor the model accepts, got {type(example_input).__name__} "
        f"{_brief(example_input)}: pass "
        f"e.g. example_input=torch.randn(2, {input_channels(model) or 3}, 224, 224), or leave it out"
    )


def _example_for(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input
    ref = next(model.parameters(), None)
    ref = ref if ref is not None else next(model.buffers(), torch.empty(0))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    channels = input_channels(model) or 3
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


def hidden_width(channels: int, reduction: int, divisor: int | None = None) -> int:
    """The excitation's hidden width: C // r, or with ``divisor`` C / r rounded to the nearest multiple of it (never
    below ``divisor``), as timm's SE modules round it (``make_divisible(C / r, divisor, round_limit=0)``)."""
    if divisor is None:
        return channels // reduction
    return max(divisor, int(channels / reduction + divisor / 2) // divisor * divisor)


def _narrow(channels: int, reduction: int, where: str) -> str:
    return (
        f"reduction={reduction} is larger than the {channels} channels of {where or 'the top-level sum'}: "
        f"the excitation's hidden layer C // r would be empty. Use reduction <= {channels}, divisor=8 (timm-style "
        f"rounding, hidden width >= 8), or leave that block out with where=lambda owner: owner != {where!r}"
    )


def _make_se(
    channels: int, reduction: int, init: str, like: torch.Tensor | None, where: str, options: dict,
    divisor: int | None = None,
) -> nn.Module:
    if options["se_layer"] is not None:
        return _user_se(options["se_layer"], channels, like, where)
    hidden = hidden_width(channels, reduction, divisor)
    if hidden < 1:
        raise SurgeryError(_narrow(channels, reduction, where) + ".")
    se = SELayer(channels, hidden, squeeze=options["squeeze"], excitation=options["excitation"], bias=options["bias"])
    se.reset_parameters(identity=init == "identity")
    if like is not None:
        se.to(device=like.device, dtype=like.dtype)
    return se


def _user_se(factory: SELayerFactory, channels: int, like: torch.Tensor | None, where: str) -> nn.Module:
    block = where or "the top-level sum"
    try:
        se = factory(channels)
    except Exception as err:
        raise SurgeryError(f"se_layer({channels}) failed for {block}: {err}") from err
    if not isinstance(se, nn.Module):
        raise SurgeryError(f"se_layer({channels}) must return an nn.Module, got {type(se).__name__} (for {block})")
    if like is not None:
        se.to(device=like.device, dtype=like.dtype)
    why = check_shape_kept(se, channels, like)
    if why is not None:
        raise SurgeryError(
            f"se_layer({channels}) = {type(se).__name__} cannot go into {block}: {why}. An se_layer must map "
            f"N x C x H x W to the same shape (a gated copy of its input), like timm's EcaModule or SEModule."
        )
    return se


def _check_options(reduction: int, init: str, options: dict) -> None:
    if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
        raise SurgeryError(f"reduction must be an integer >= 1 (the paper's r, default 16); got {reduction!r}")
    if init not in ("he", "identity"):
        raise SurgeryError(f"init must be 'he' or 'identity'; got {init!r}")
    for key, allowed in (("position", POSITIONS), ("squeeze", tuple(SQUEEZES)), ("excitation", tuple(EXCITATIONS))):
        if options[key] not in allowed:
            raise SurgeryError(f"{key} must be one of {', '.join(map(repr, allowed))}; got {options[key]!r}")
    if not isinstance(options["bias"], bool):
        raise SurgeryError(f"bias must be True or False; got {options['bias']!r}")
    if init == "identity" and not options["bias"] and options["se_layer"] is None:
        raise SurgeryError(
            "init='identity' opens the gates through fc2's bias, so it needs bias=True (without biases every gate "
            "would start at sigma(0): half the branch for sigmoid, none of it for tanh and relu)"
        )
    if options["se_layer"] is not None and not callable(options["se_layer"]):
        raise SurgeryError(
            f"se_layer must be a callable channels -> nn.Module (a class such as timm.layers.EcaModule, or a "
            f"lambda); got {options['se_layer']!r}"
        )


def _grouped(skipped: list[tuple[str, Skipped]], failed: Sequence[tuple[str, str, SurgeryError]] = ()) -> str:
    """One line for everything left without SE: sums by reason, then blocks fx could not trace or run, by class."""
    by_reason: dict[str, list[str]] = {}
    for owner, skip in skipped:
        by_reason.setdefault(skip.reason, []).append(owner or "<top>")
    by_class: dict[str, list[tuple[str, SurgeryError]]] = {}
    for owner, kind, err in failed:
        by_class.setdefault(kind, []).append((owner or "<top>", err))
    parts = []
    for reason, owners in by_reason.items():
        parts.append(f"{len(owners)} sum(s) where {reason} ({_shown(owners)})")
    for kind, errors in by_class.items():
        first = str(errors[0][1]).rstrip(".")
        if len(errors) == 1:
            parts.append(f"1 block left as it is: {first}")
        else:
            others = _shown([o for o, _ in errors[1:]])
            parts.append(f"{len(errors)} blocks left as they are: {first} (also {others}, the same class)")
    return "; ".join(parts)


def _found(skipped: list[tuple[str, Skipped]], failed: Sequence[tuple[str, str, SurgeryError]]) -> str:
    """What a model holds instead of a residual unit that can take an SE, by count, without the API's advice."""
    reasons: dict[str, int] = {}
    for _, skip in skipped:
        reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
    parts = [f"{n} sum(s) where {reason}" for reason, n in reasons.items()]
    if failed:
        classes = ", ".join(dict.fromkeys(kind for _, kind, _ in failed))
        parts.append(f"{len(failed)} block(s) torch.fx cannot trace or run ({classes})")
    return "; ".join(parts[:3]) + (f"; and {len(parts) - 3} other kind(s)" if len(parts) > 3 else "")


def _no_unit(message: str, found: str) -> SurgeryError:
    """The error for a model without a residual unit that can take an SE. ``found``, what the model holds instead
    (free of Python advice), is kept as ``error.no_unit``, so a command line can word its own way out."""
    error = SurgeryError(message)
    error.no_unit = found
    return error


def _shown(owners: list[str]) -> str:
    return ", ".join(owners[:4]) + (f" and {len(owners) - 4} more" if len(owners) > 4 else "")

def add_se(
    model: nn.Module,
    reduction: int = 16,
    *,
    where: Where = None,
    position: Position = "standard",
    squeeze: Squeeze = "avg",
    excitation: Excitation = "sigmoid",
    bias: bool = True,
    se_layer: SELayerFactory | None = None,
    init: Literal["he", "identity"] = "he",
    leaf_modules: Sequence[str | type] = (),
    autowrap_functions: Sequence[Callable] = (),
    example_input: torch.Tensor | None = None,
    fuse: bool = True,
    inplace: bool = False,
    divisor: int | None = None,
    strict: bool = False,
) -> nn.Module:
    """Put an SE block at every residual sum of ``model``; by default SENet's "standard SE" on the branch.

    Each residual sum ``x + F(x)`` becomes ``x + SE(F(x))`` (for the default ``position``), the SE being
    :class:`~.se_module.SELayer` (torchvision's ``SqueezeExcitation(C, C // r)``) placed after the branch's last norm
    and before any drop-path / layer-scale factor. It is registered at ``<owner>.se`` (``se_1``, ``se_2``... for
    further sums in the same module), ``<owner>`` being the module whose forward holds the sum, which keeps its
    class. Sums that are not residual (ties, 3-D tokens, branches already gated, inner sums of a block) are skipped,
    and so are blocks fx cannot trace or run and blocks narrower than r: one logged warning names them, why, and the
    way out.

    Args:
        model: any CNN (torchvision, timm, your own); left untouched unless ``inplace``.
        reduction: the reduction ratio r; the excitation's hidden width is C // r (Table 10).
        where: which blocks get an SE: a predicate on owner names, or a list of paper stages (``[4]`` for
            conv4_x only, Table 13), owner-name prefixes (``"layer3"``) or paper names (``"SE_5_2"``). None: all.
        position: the integration strategy (Fig. 5, Tables 14-15): ``"standard"`` (branch, before the sum),
            ``"pre"`` (SE-PRE: start of the branch, on the unit's input), ``"post"`` (SE-POST: after the sum and its
            non-linearity), ``"identity"`` (SE-Identity: on the skip), ``"3x3"`` (SE 3x3: after the branch's
            spatial convolution and its norm and activation; blocks without one are skipped and reported).
        squeeze: z = global ``"avg"`` pooling (default), ``"max"`` pooling (Table 11) or ``"none"`` (NoSqueeze,
            Table 16: the FC layers run as 1x1 convolutions at full resolution; the gate s is N x C x H x W).
        excitation: the gate sigma: ``"sigmoid"`` (default), ``"tanh"`` or ``"relu"`` (Table 12).
        bias: FC layers with biases (default, the released models and timm) or without (the paper's ablations).
        se_layer: instead of the SE above, any callable ``channels -> nn.Module`` mapping N x C x H x W to the same
            shape (timm's ``EcaModule``, ``CbamModule``, a gate of your own), put at ``position`` under the same
            names; ``reduction``, ``squeeze``, ``excitation``, ``bias`` and ``init`` then do not apply.
        init: ``"he"`` (the paper's He initialisation) or ``"identity"`` (gates start at 1, so a pretrained
            network's outputs are unchanged when fine-tuning starts).
        leaf_modules: module names or types whose own forward is not traced (the way out when fx cannot trace
            one); their children are still searched.
        autowrap_functions: functions fx should record as calls rather than trace through.
        example_input: an input the model accepts, for shape propagation; default ``randn(2, 3, 64, 64)``.
        fuse: fuse the standard SE with its residual sum, ``skip + u * s`` in one pass (``torch.addcmul``, the
            Caffe SENet's Axpy layer; the block calls ``se(u, skip)``) instead of ``se(u)`` and then the sum. Same
            parameters, state_dict keys and outputs (to float rounding); hooks on ``se.scale_activation`` still see
            s, hooks on the SE module itself see the fused call (in inference the sum may be written into u's
            storage, as ``out += identity`` does: a hook that keeps u must clone it). Stays unfused: the non-standard
            positions, ``se_layer=`` modules, and branches with a drop-path or layer-scale step between the SE and the sum.
            ``fuse=False`` gives ``x + se(F(x))`` with ``se(u) = u * s``, a multiply and then the add.
        inplace: modify ``model`` itself.
        divisor: round the hidden width C / r to a multiple of ``divisor`` (never below it), as timm's
            ``make_divisible``; then blocks narrower than r get an SE too. None: C // r, the paper's width.
        strict: raise on the first block fx cannot trace or run, or that is narrower than r, instead of skipping it.

    Returns:
        The SE model: every module keeps its class (a rewritten block's class is a subclass of its original with
        the same name), methods and state_dict keys; the SE parameters are the only new keys.

    Raises:
        SurgeryError: ``model`` is no eager ``nn.Module`` instance (None, a name, the class, a ScriptModule), an
            ``example_input`` that is no tensor or that the model fails on, a bad option value, nothing left to gate
            (no residual sum, every one skipped, a ``where`` that selects nothing, a ``position`` that fits no
            selected block), an ``se_layer`` that changes the shape, or with ``strict`` any block skipped because fx
            cannot trace it or it is narrower than r.
            ``model`` is then unchanged.

    Examples:
        >>> se_resnet50 = add_se(torchvision.models.resnet50())
        >>> se_blocks(se_resnet50)["layer4.1.se"].fc1.out_channels
        128
        >>> se3x3 = add_se(torchvision.models.resnet50(), position="3x3", bias=False)  # Table 15's SE 3x3
    """
    _check_model(model, "add_se")
    _check_example(example_input, model)
    options = {"position": position, "squeeze": squeeze, "excitation": excitation, "bias": bias, "se_layer": se_layer}
    _check_options(reduction, init, options)
    if divisor is not None and (not isinstance(divisor, int) or isinstance(divisor, bool) or divisor < 1):
        raise SurgeryError(f"divisor must be None or an integer >= 1 (timm rounds SE widths to 8); got {divisor!r}")
    if not isinstance(fuse, bool):
        raise SurgeryError(f"fuse must be True or False; got {fuse!r}")
    leaves = _leaf_names(model, leaf_modules)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    probe = probe_sums(target, _example_for(target, example_input))

    plans: dict[str, tuple[fx.Graph, list[Residual]]] = {}
    skipped: list[tuple[str, Skipped]] = []
    failed: list[tuple[str, str, SurgeryError]] = []  # blocks fx cannot trace or run: (owner, class, error)
    for owner in probe.owners:
        if owner in leaves:
            continue
        module = modules[owner]
        args, kwargs = probe.inputs[owner]
        try:
            concrete = concrete_arguments(module, args, kwargs)
            graph = trace_module(module, owner, autowrap_functions=autowrap_functions, concrete_args=concrete)
            propagate_shapes(module, graph, owner, args, kwargs)
        except SurgeryError as err:
            if strict:
                raise
            failed.append((owner, type(module).__name__, err))
            continue
        found = []
        for verdict in residual_units(graph, dict(module.named_modules())):
            (found if isinstance(verdict, Residual) else skipped).append(
                verdict if isinstance(verdict, Residual) else (owner, verdict)
            )
        if found:
            plans[owner] = (graph, found)
    held = _fused_owners(modules, probe.owners, leaves, skipped)
    forward = probe.owners if not held else sorted([*probe.owners, *held], key=list(probe.inputs).index)
    if not plans:
        if skipped or failed:
            raise _no_unit(
                f"no residual sum of {type(model).__name__} can take an SE: {_grouped(skipped, failed)}. A model "
                "whose blocks are already gated (add_se applied twice, EfficientNet, RegNetY, SE-ResNet) needs none; "
                "for the plain version, start from the model without attention (e.g. regnet_x instead of regnet_y).",
                f"no residual sum of {type(model).__name__} can take an SE: {_found(skipped, failed)}",
            )
        raise _no_unit(
            f"found no residual sum in {type(model).__name__}: no module adds two same-shape tensors. add_se works "
            "on residual networks (x + F(x)); plain stacks such as VGG and concatenating ones such as DenseNet have "
            "none. If a block was listed in leaf_modules=, drop it from there; where= only chooses among residual "
            "blocks, so it cannot create one.",
            f"found no residual sum in {type(model).__name__}: no module adds two same-shape tensors, as in a plain "
            "stack (VGG) or a concatenating network (DenseNet)",
        )
    paper = paper_names_for(o for o in forward if o in plans or o in held)
    keep = _where_filter(where, paper)
    plans = {owner: plan for owner, plan in plans.items() if keep(owner)}
    if not plans:
        raise SurgeryError(
            f"where={where!r} excluded every residual block; candidates: "
            + ", ".join(f"{o or '<top>'} ({p})" for o, p in paper.items())
        )
    for owner, (graph, found) in list(plans.items()):  # blocks narrower than r: skipped (strict: refused)
        wide = [r for r in found if se_layer is not None or hidden_width(r.channels, reduction, divisor) >= 1]
        for r in found:
            if r not in wide:
                if strict:
                    raise SurgeryError(_narrow(r.channels, reduction, owner) + ".")
                reason = (
                    f"the block has {r.channels} channels, fewer than r={reduction} (C // r would be 0; pass a smaller "
                    "reduction, divisor=8, or where= to leave it out)"
                )
                skipped.append((owner, Skipped(r.add, reason)))
        if wide:
            plans[owner] = (graph, wide)
        else:
            del plans[owner]
    if skipped or failed:
        logger.warning("add_se skipped %s", _grouped(skipped, failed))
    if not plans:
        raise SurgeryError(
            f"no residual block of {type(model).__name__} is wide enough for r={reduction}: "
            f"{_grouped(skipped, failed)}."
        )

    placed = _placements(plans, position, modules)
    described = {**options, "se_layer": None}
    if se_layer is not None:
        described.update(squeeze=None, excitation=None, bias=None, se_layer=getattr(se_layer, "__name__", repr(se_layer)))
    blocks: dict[str, list[tuple[Placement, str, nn.Module]]] = {}
    for owner, placements in placed.items():
        like = next(modules[owner].parameters(), None)
        names = _free_se_names(modules[owner], owner, len(placements))
        blocks[owner] = []
        for k, (p, name) in enumerate(zip(placements, names)):
            se = _make_se(p.channels, reduction, init, like, owner, options, divisor)
            se._se_surgery = {  # marks the blocks add_se made (remove_se never touches others), survives copies
                "paper_name": paper[owner] + (f"_{k + 1}" if k else ""),
                "order": (forward.index(owner), k),  # forward order of the sums
                "replaced_none": getattr(modules[owner], name.rpartition(".")[2], 0) is None,
                **described,
                "fused": fuse and se_layer is None and _fusable(p, position),
            }
            blocks[owner].append((p, name, se))

    for owner, inserts in blocks.items():  # nothing above touched the model; from here on nothing can fail
        block, graph = modules[owner], plans[owner][0]
        graph.owning_module = block  # lint checks the SE targets against the block itself
        for p, name, se in inserts:
            leaf = name.rpartition(".")[2]
            block.__dict__.pop(leaf, None)  # timm blocks hold `self.se = None` when built without attention
            block.add_module(leaf, se)
            if se._se_surgery["fused"]:
                _fuse(p.residual, leaf, block)
                continue
            # after a placeholder (SE-PRE on the block's input) the SE goes just before its first reader
            spot = graph.inserting_before(p.readers[0]) if p.after.op == "placeholder" else graph.inserting_after(p.after)
            with spot:
                node = graph.create_node("call_module", leaf, (p.after,))
            p.after.replace_all_uses_with(node, delete_user_cb=lambda user, readers=p.readers: user in readers)
        graph.lint()
        rewrite(block, graph)
    logger.info("add_se: %d SE block(s) with r=%d in %s", sum(map(len, blocks.values())), reduction, type(model).__name__)
    return target


def _placements(
    plans: dict[str, tuple[fx.Graph, list[Residual]]], position: Position, modules: dict[str, nn.Module]
) -> dict[str, list[Placement]]:
    """Each selected block's SE places for ``position``; raises if no block has one."""
    placed: dict[str, list[Placement]] = {}
    skipped: list[tuple[str, Skipped]] = []
    for owner, (graph, found) in plans.items():
        if _se_leaves(modules[owner]):  # SE-POST / PRE / Identity sit off the branch, where the gate rule cannot see them
            skipped.extend((owner, Skipped(r.add, "its block already holds an SE from add_se")) for r in found)
            continue
        for r in found:
            _make_out_of_place(graph, r.add)
        order = {node: i for i, node in enumerate(graph.nodes)}
        submodules = dict(modules[owner].named_modules())
        for r in found:
            verdict = place(r, position, submodules, order)
            if isinstance(verdict, Skipped):
                skipped.append((owner, verdict))
            else:
                placed.setdefault(owner, []).append(verdict)
    if skipped:
        logger.warning("add_se(position=%r) skipped %s", position, _grouped(skipped))
    if not placed and all("already holds" in skip.reason for _, skip in skipped):
        raise SurgeryError(f"no residual sum can take an SE: {_grouped(skipped)}")
    if not placed:
        raise SurgeryError(
            f"position={position!r} fits none of the selected residual blocks: {_grouped(skipped)}. Pick another "
            f"position ({', '.join(map(repr, POSITIONS))}) or other blocks with where=."
        )
    return placed


_WROTE_INTO = "se_surgery_wrote_into"  # node.meta key: the operand an in-place sum wrote into


def _make_out_of_place(graph: fx.Graph, add: fx.Node) -> None:
    """``out.add_(x)`` / ``out += x`` -> ``s = out + x``, later readers of ``out`` reading ``s``.

    An in-place sum mutates its first operand; once the SE scales the branch, that operand is no longer the tensor
    later nodes read, so the mutation is made explicit in the graph (same values, in the same order). The operand
    it wrote into is kept in ``add.meta``: a fused SE may write its sum there too.
    """
    in_place = (add.op == "call_method" and add.target in ("add_", "__iadd__")) or (
        add.op == "call_function" and add.target is operator.iadd
    )
    if not in_place:
        return
    mutated = add.args[0]
    add.meta[_WROTE_INTO] = mutated
    order = {n: i for i, n in enumerate(graph.nodes)}
    add.target = "add" if add.op == "call_method" else operator.add
    for user in [u for u in mutated.users if order[u] > order[add]]:
        user.replace_input_with(mutated, add)


def _fusable(p: Placement, position: Position) -> bool:
    """Whether the standard SE of ``p`` can run fused with its sum: the branch feeds a plain two-operand add."""
    r = p.residual
    return (
        position == "standard"
        and p.after is r.branch
        and p.readers == (r.add,)
        and len(r.add.args) == 2
        and not r.add.kwargs
        and set(r.add.args) == {r.branch, r.skip}
    )


def _fresh(module: nn.Module) -> bool:
    """Whether ``module`` returns a tensor of its own (a norm, convolution or linear layer, or a Sequential ending in
    one), not its input or a view of another tensor."""
    if isinstance(module, nn.Sequential):
        return len(module) > 0 and _fresh(module[-1])
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.modules.conv._ConvNd, nn.Linear))


def _fuse(r: Residual, leaf: str, block: nn.Module) -> None:
    """``branch + skip`` -> ``self.<leaf>(branch, skip, overwrite)``: the SE computes ``skip + branch * s`` in one pass.

    The add node itself becomes the SE call, so other placements that read the sum keep a valid node. ``overwrite``
    (the sum may be written into the branch tensor when autograd is off, as torchvision's ``out += identity`` does):
    the block's own sum wrote into it, or nothing but the sum reads it and it is the fresh output of a norm / conv.
    """
    add, branch = r.add, r.branch
    overwrite = add.meta.get(_WROTE_INTO) is branch or (
        len(branch.users) == 1 and branch.op == "call_module" and _fresh(block.get_submodule(branch.target))
    )
    add.op, add.target = "call_module", leaf
    add.args, add.kwargs = (r.branch, r.skip, overwrite), {}


def _fused_owners(
    modules: dict[str, nn.Module], owners: list[str], leaves: set[str], skipped: list[tuple[str, Skipped]]
) -> list[str]:
    """Blocks whose sums all run fused inside an SE of ours (so the probe saw no sum there), each fused sum added
    to ``skipped``: such a block holds an SE already, and still counts when blocks are numbered."""
    held = []
    for owner, module in modules.items():
        if owner in owners or owner in leaves or not is_rewritten(module) or not _se_leaves(module):
            continue
        graph = trace_module(module, owner)
        fused = [n for n in graph.nodes if n.op == "call_module" and n.target in _se_leaves(module) and len(n.args) > 1]
        skipped.extend((owner, Skipped(n, "its block already holds an SE from add_se")) for n in fused)
        held += [owner] if fused else []
    return held


def _free_se_names(module: nn.Module, owner: str, count: int) -> list[str]:
    names, index = [], 0
    while len(names) < count:
        leaf = se_name("", index)
        taken = getattr(module, leaf, None) is not None
        if not taken:
            names.append(se_name(owner, index))
        index += 1
    return names


def se_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The SE blocks that :func:`add_se` inserted (``SELayer`` or ``se_layer=`` modules), by name, in forward order.

    A block counts when it carries add_se's metadata, sits at ``<owner>.se`` / ``se_<k>``, and ``<owner>``'s
    rewritten forward calls it.
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
        stage = [b for b in blocks if paper.get(b, "").startswith(f"SE_{item}_")]
        if not stage:
            stages = sorted({int(p.split("_")[1]) for p in paper.values() if p.count("_") >= 2})
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
    _check_model(model, "remove_se")
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
        block = target.get_submodule(owner)
        graph = trace_module(block, owner)  # its generated forward, SE calls included, children as leaves
        for leaf in leaves:
            (node,) = [n for n in graph.nodes if n.op == "call_module" and n.target == leaf]
            if len(node.args) > 1:  # fused: se(branch, skip, overwrite) -> branch + skip
                node.op, node.target, node.args = "call_function", operator.add, node.args[:2]
            else:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            replaced_none = getattr(block, leaf)._se_surgery["replaced_none"]
            delattr(block, leaf)
            if replaced_none:
                block.__dict__[leaf] = None  # timm blocks built without attention hold `se = None`: give it back
        left = [n for n in graph.nodes if n.op == "call_module" and n.target in _se_leaves(block)]
        if left:
            graph.lint()
            rewrite(block, graph)
        else:
            restore(block)  # no SE of ours left: the original forward, bit for bit
    return target


def _se_leaves(block: nn.Module) -> set[str]:
    """Names of ``block``'s direct children that add_se made."""
    return {leaf for leaf, child in block.named_children() if isinstance(child.__dict__.get("_se_surgery"), dict)}
