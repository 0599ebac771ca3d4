"""What :func:`add_se` would do, worked out without touching the model: :func:`plan` returns a :class:`Plan`.

Planning runs probe -> trace -> classify -> name -> select: one eager forward finds the modules whose own forward
adds two same-shape tensors (:mod:`.probe`); each is traced alone with fx (:mod:`.tracing`); the residual rule
(:mod:`.residual`) tells branch from skip; the units get paper names (:mod:`.naming`); ``where=``, the width check and
the position (:mod:`.positions`) choose among them. The plan prints as a table; :func:`~.insert.apply_plan` (which
``add_se`` calls after planning) builds and inserts the SE blocks.

A **unit** is a place an SE goes (a residual sum); its **owner** is the module whose forward holds it.
"""

from __future__ import annotations

import copy
import enum
import functools
import inspect
import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import fx, nn

from ..errors import SurgeryError
from ..paper import paper_stage
from .attach import resolution_names, site_for
from .concat import After, concat_units
from .config import SEConfig
from .inputs import check_example, check_model, default_examples, leaf_names, unresized
from .naming import paper_names_for, se_children, se_name
from .plain import is_gate_module, plain_units, pointwise_after_depthwise
from .positions import POSITIONS, Placement, place
from .probe import Probe, probe_first
from .refusals import grouped, no_unit
from .residual import Residual, _shape, residual_units
from .skips import SkipKind, Skipped, Untraceable
from .subclass import none_arguments, runs_generated_forward
from .tracing import concrete_arguments, propagate_shapes, trace_module

__all__ = ["plan", "Plan", "Unit", "UnitKind", "Skip", "hidden_width", "Where"]

logger = logging.getLogger(__name__)

Where = Union[None, Callable[[str], bool], Iterable[Union[int, str]]]
WROTE_INTO = "se_surgery_wrote_into"  # node.meta key: the operand an in-place sum wrote into


class UnitKind(enum.Enum):
    """The kinds of place an SE goes (SENet Sec. 3.3)."""

    RESIDUAL = "residual"  # x + F(x): the SE recalibrates F(x) before the sum (Fig. 3)
    PLAIN = "plain"  # after the non-linearity that follows a convolution (VGG, MobileNet: Sec. 3.3)
    BRANCHES = "branches"  # on the concatenated output of parallel branches (an Inception module, Fig. 2)
    DENSE = "dense"  # on new features joined to the carried input (DenseNet, ShuffleNetV2's split units)


@dataclass(frozen=True)
class Unit:
    """One SE to put in: on ``owner``'s unit, registered as ``se_name``, ``channels`` wide, ``hidden`` = C // r."""

    owner: str
    se_name: str
    paper_name: str
    kind: UnitKind
    channels: int
    hidden: int | None  # the excitation's hidden width; None for an se_layer= module
    position: str
    fused: bool
    placement: Placement = field(repr=False, compare=False)


@dataclass(frozen=True)
class Skip:
    """A same-shape sum that gets no SE: in ``owner``, at graph node ``node``, of ``kind``, for ``reason``."""

    owner: str
    node: str
    kind: SkipKind
    reason: str


class Plan:
    """The SE blocks :func:`add_se` would insert: ``units`` in forward order, ``skipped`` sums, ``untraceable`` owners.

    ``print(plan)`` shows it as a table; ``len(plan)`` is the number of SE blocks; :func:`~.insert.apply_plan`
    carries it out, once. ``model`` is the model planned, which planning leaves as it was: the probe and the traces
    run on a private copy, which ``apply_plan`` then fills (or, ``inplace``, ``model`` itself).
    """

    def __init__(self, model: nn.Module, working: nn.Module, config: SEConfig, units: list[Unit],
                 skipped: list[Skip], untraceable: list[Untraceable], graphs: dict[str, fx.Graph],
                 order: dict[str, int]) -> None:
        self.model, self.config = model, config
        self.units, self.skipped, self.untraceable = tuple(units), tuple(skipped), tuple(untraceable)
        self._working, self._structure = working, structure(model)
        self._graphs, self._order, self._applied = graphs, order, False

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units)

    @property
    def owners(self) -> list[str]:
        """The owners that get an SE, in forward order."""
        return list(dict.fromkeys(u.owner for u in self.units))

    def __repr__(self) -> str:
        return f"<Plan: {len(self.units)} SE block(s) for {type(self.model).__name__}, {len(self.skipped)} skipped>"

    def __str__(self) -> str:
        return _table(self)


def structure(model: nn.Module) -> list[tuple[str, type]]:
    """Every module's name and class: what must not change between planning and applying in place."""
    return [(name, type(module)) for name, module in model.named_modules()]


def _working_copy(model: nn.Module) -> nn.Module:
    """A copy to probe and trace, so planning never touches ``model`` (lazy modules, buffers a forward updates)."""
    try:
        return copy.deepcopy(model)
    except Exception as err:  # a model that cannot be copied is planned on itself, as add_se(inplace=True) did
        logger.debug("planning on %s itself: it cannot be deep-copied (%s)", type(model).__name__, err)
        return model


def hidden_width(channels: int, reduction: int, divisor: int | None = None) -> int:
    """The excitation's hidden width: C // r, or with ``divisor`` C / r rounded to the nearest multiple of it (never
    below ``divisor``), as timm's SE modules round it (``make_divisible(C / r, divisor, round_limit=0)``)."""
    if divisor is None:
        return channels // reduction
    return max(divisor, int(channels / reduction + divisor / 2) // divisor * divisor)


def narrow_message(channels: int, reduction: int, owner: str) -> str:
    return (
        f"reduction={reduction} is larger than the {channels} channels of {owner or 'the top-level sum'}: "
        f"the excitation's hidden layer C // r would be empty. Use reduction <= {channels}, divisor=8 (timm-style "
        f"rounding, hidden width >= 8), or leave that block out with where=lambda owner: owner != {owner!r}"
    )


def make_config(config: SEConfig | None, reduction: int | None, options: dict[str, Any]) -> SEConfig:
    """``config`` (default: the paper's SE) with ``reduction`` and ``options`` (SEConfig fields) applied, validated."""
    if config is not None and not isinstance(config, SEConfig):
        raise SurgeryError(f"config must be an se_surgery.SEConfig; got {type(config).__name__}")
    fields = SEConfig.defaults()
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise SurgeryError(f"unknown option(s) {unknown}: the SE options are {', '.join(fields)} (see SEConfig)")
    changes = {**options, **({"reduction": reduction} if reduction is not None else {})}
    base = config or SEConfig()
    return base.replace(**changes) if changes else base


UNIT_RULES = ("auto", "residual", "concat", "plain")


def plan(
    model: nn.Module,
    reduction: int | None = None,
    *,
    config: SEConfig | None = None,
    where: Where = None,
    units: str = "auto",
    leaf_modules: Sequence[str | type] = (),
    autowrap_functions: Sequence[Callable] = (),
    example_input: torch.Tensor | None = None,
    strict: bool = False,
    **options: Any,
) -> Plan:
    """Work out where :func:`add_se` would put SE blocks in ``model``, without changing it.

    Takes :func:`add_se`'s arguments (but ``inplace``); see there. ``print(plan(model))`` shows the units.

    Examples:
        >>> p = plan(torchvision.models.resnet50())
        >>> len(p), p.units[-1].paper_name, p.units[-1].hidden
        (16, 'SE_5_3', 128)
    """
    check_model(model, "plan")
    check_example(example_input, model)
    chosen = make_config(config, reduction, options)
    if not isinstance(strict, bool):
        raise SurgeryError(f"strict must be True or False; got {strict!r}")
    if units not in UNIT_RULES:
        raise SurgeryError(
            f"units={units!r} is no unit rule: pass one of {', '.join(map(repr, UNIT_RULES))} ('auto': residual "
            "units where the network has residual sums, else its concatenated branches, else its plain chain)"
        )
    leaves = leaf_names(model, leaf_modules)
    working = _working_copy(model)
    modules = dict(working.named_modules())
    candidates = [example_input] if example_input is not None else default_examples(working)
    with unresized(working, candidates[0]):  # a detection model would first upscale the probe to 800 px
        probe, _ = probe_first(working, candidates)
    holding: list[tuple[str, Skipped]] = []
    holding_se = _owners_with_fused_se(modules, probe.owners, leaves, holding)
    if units == "residual" or (units == "auto" and (probe.owners or holding_se)):
        found = _plan_residual(model, modules, probe, chosen, where, leaves, autowrap_functions, strict,
                               (holding_se, holding))
    else:
        found = _plan_attached(model, modules, probe, chosen, where, leaves, autowrap_functions, strict, units)
    return Plan(model, working, chosen, *found)


def _plan_residual(model, modules, probe, chosen, where, leaves, autowrap_functions, strict, holds) -> tuple:
    """The residual rule's units, skips, untraceable owners, graphs and forward order (see :func:`plan`); ``holds``:
    the owners whose sums run fused in an SE already, and those sums."""
    residuals, skipped, untraced = _trace_owners(probe.owners, probe, modules, leaves, autowrap_functions, strict,
                                                 residual_units, Residual)
    holding_se, holding = holds
    skipped += holding
    forward = probe.owners if not holding_se else sorted([*probe.owners, *holding_se], key=list(probe.inputs).index)
    if not residuals:
        raise _nothing_found(model, skipped, untraced)
    paper = paper_names_for(o for o in forward if o in residuals or o in holding_se)
    excluded = _select(residuals, where, paper)
    _drop_narrow(residuals, chosen, skipped, strict)
    if skipped or untraced:
        logger.warning("add_se skipped %s", grouped(skipped, untraced))
    if not residuals:
        raise SurgeryError(
            f"no residual block of {type(model).__name__} is wide enough for r={chosen.reduction}: "
            f"{grouped(skipped, untraced)}."
        )
    placed, unplaced = _placements(residuals, chosen, modules)
    order = {owner: i for i, owner in enumerate(forward)}
    planned = [u for owner, found in placed.items() for u in _units(owner, found, chosen, modules, paper)]
    skips = [_skip(owner, s) for owner, s in [*skipped, *unplaced]] + [
        _skip(o, s, SkipKind.NOT_SELECTED) for o, s in excluded
    ]
    graphs = {owner: residuals[owner][0] for owner in placed}
    return planned, skips, untraced, graphs, order


_BY_DESIGN = {SkipKind.INNER_CONCAT, SkipKind.OUTSIDE_UNITS, SkipKind.NO_BRANCHES}  # the rule's own choices
_KINDS = {"plain": UnitKind.PLAIN, "inception": UnitKind.BRANCHES, "dense": UnitKind.DENSE}


def _plan_attached(model, modules, probe, chosen, where, leaves, autowrap_functions, strict, units) -> tuple:
    """The plain and multi-branch rules' units (Sec. 3.3): each channel concatenation of branches, or for a network
    without any (``units="plain"``, or "auto"), each non-linearity after a convolution. See :func:`plan`."""
    name = type(model).__name__
    if chosen.position != "standard":
        raise SurgeryError(
            f"position={chosen.position!r} places an SE around a residual sum, and {name} gets "
            f"{'plain' if units == 'plain' else 'plain or multi-branch'} units, which have none: leave position at "
            "'standard' (the SE follows the unit's output)"
        )
    gated = {n for n, m in modules.items() if "_se_surgery" in m.__dict__ or is_gate_module(m)}
    inside_gate = [o for o in [*probe.cat_owners, *probe.conv_owners]
                   if any(o == g or o.startswith(g + ".") for g in gated if g)]
    convs = [modules[n] for n in probe.inputs if isinstance(modules.get(n), nn.modules.conv._ConvNd)]
    plain = functools.partial(plain_units, pointwise=pointwise_after_depthwise(convs))
    tried = [("concat", probe.cat_owners, concat_units), ("plain", probe.conv_owners, plain)]
    for rule, owners, finder in tried if units == "auto" else [t for t in tried if t[0] == units]:
        owners = [o for o in owners if o not in inside_gate]
        found, skipped, untraced = _trace_owners(owners, probe, modules, leaves, autowrap_functions, strict, finder,
                                                 After)
        if found:
            break
    if not found:
        raise _nothing_found(model, skipped, untraced, units)
    _only_separable(found, skipped)
    sites, held, graph_of = [], [], {}
    for owner, (graph, afters) in found.items():
        for after in afters:
            site = site_for(owner, graph, after, modules, probe.calls, leaves, probe.inputs, autowrap_functions)
            if isinstance(site, Skipped):
                skipped.append((owner, site))
            elif graph_of.setdefault(site.module, site.graph) is not site.graph or any(
                    s.module == site.module and s.after is site.after for s in sites):
                skipped.append((owner, Skipped(after.node, SkipKind.INNER_CONCAT,
                                               "its tensor already gets an SE from another unit (one SE per tensor)")))
            elif se_children(modules[site.module]):
                held.append((site.module, Skipped(site.after, SkipKind.HOLDS_SE, "it holds an SE from add_se")))
            else:
                sites.append(site)
    if not sites:
        raise SurgeryError(f"no unit of {name} can take an SE: {grouped([*skipped, *held], untraced)}")
    paper = resolution_names(sites)
    keep = _where_filter(where, paper)
    excluded = [(s.module, Skipped(s.after, SkipKind.NOT_SELECTED, "where= leaves it out")) for s in sites
                if not keep(s.module)]
    sites = [s for s in sites if keep(s.module)]
    if not sites:
        raise SurgeryError(f"where={where!r} excluded every unit; candidates: "
                           + ", ".join(f"{o} ({p})" for o, p in paper.items()))
    planned, graphs, order, narrow = _attached_units(sites, chosen, modules, paper, strict)
    skipped += held + narrow
    lost = [(o, s) for o, s in skipped if s.kind not in _BY_DESIGN]  # the plan's table still lists the others
    if lost or untraced:
        logger.warning("add_se skipped %s", grouped(lost, untraced))
    if not planned:
        raise SurgeryError(f"no unit of {name} is wide enough for r={chosen.reduction}: {grouped(skipped)}.")
    skips = [_skip(o, s) for o, s in skipped] + [_skip(o, s, SkipKind.NOT_SELECTED) for o, s in excluded]
    return planned, skips, untraced, graphs, order


def _only_separable(found: dict[str, tuple[fx.Graph, list[After]]], skipped: list) -> None:
    """In a network of depthwise separable units (MobileNet), keep only those (in place): its stem is no unit."""
    every = [a for _, afters in found.values() for a in afters]
    if 2 * sum(a.separable for a in every) <= len(every):  # not a network built of them
        return
    for owner, (graph, afters) in list(found.items()):
        skipped += [(owner, Skipped(a.node, SkipKind.OUTSIDE_UNITS, "a convolution outside the network's depthwise "
                                    "separable units (its stem or head), which alone get an SE")) for a in afters
                    if not a.separable]
        kept = [a for a in afters if a.separable]
        if kept:
            found[owner] = (graph, kept)
        else:
            del found[owner]


def _attached_units(sites, config: SEConfig, modules: dict, paper: dict, strict: bool) -> tuple:
    """The units of ``sites`` (in forward order), their graphs and order, and the sites narrower than r."""
    planned, graphs, order, narrow, count = [], {}, {}, [], {}
    for site in sites:
        ours = config.se_layer is None
        hidden = hidden_width(site.unit.channels, config.reduction, config.divisor) if ours else None
        if hidden is not None and hidden < 1:
            if strict:
                raise SurgeryError(narrow_message(site.unit.channels, config.reduction, site.module) + ".")
            narrow.append((site.module, Skipped(site.after, SkipKind.NARROW,
                                                f"it has {site.unit.channels} channels, fewer than r={config.reduction}"
                                                " (pass a smaller reduction, divisor=8, or where= to leave it out)")))
            continue
        k = count[site.module] = count.get(site.module, -1) + 1
        if k == 0:
            (se,) = _free_se_names(modules[site.module], site.module, 1)
            graphs[site.module], order[site.module] = site.graph, len(order)
        else:
            se = _free_se_names(modules[site.module], site.module, k + 1)[-1]
        placement = Placement(None, site.after, site.readers, site.unit.channels, len(_shape(site.unit.node)))
        paper_name = paper[site.module] + (f"_{k + 1}" if k else "")
        planned.append(Unit(site.module, se, paper_name, _KINDS[site.unit.kind], site.unit.channels, hidden,
                            "standard", False, placement))
    return planned, graphs, order, narrow


def _trace_owners(
    owners: Sequence[str], probe: Probe, modules: dict[str, nn.Module], leaves: set[str],
    autowrap_functions: Sequence[Callable], strict: bool, finder: Callable[[fx.Graph, dict], list], unit_type: type
) -> tuple[dict[str, tuple[fx.Graph, list]], list[tuple[str, Skipped]], list[Untraceable]]:
    """Trace each of ``owners``: the units ``finder`` finds in it (``unit_type``), the places it skips, and the
    owners fx cannot trace."""
    units: dict[str, tuple[fx.Graph, list]] = {}
    skipped: list[tuple[str, Skipped]] = []
    untraced: list[Untraceable] = []
    for owner in owners:
        if owner in leaves:
            continue
        module = modules[owner]
        args, kwargs = probe.inputs[owner]
        try:
            graph = _traced(module, owner, args, kwargs, autowrap_functions)
        except SurgeryError as err:
            if strict:
                raise
            untraced.append(Untraceable(owner, type(module).__name__, err))
            continue
        found = []
        for verdict in finder(graph, dict(module.named_modules())):
            if isinstance(verdict, unit_type):
                found.append(verdict)
            else:
                skipped.append((owner, verdict))
        if found:
            units[owner] = (graph, found)
    return units, skipped, untraced


def _traced(module: nn.Module, owner: str, args: tuple, kwargs: dict, autowrap_functions: Sequence[Callable]):
    """``module``'s forward traced and its shapes propagated on its recorded call; retried with its lists of tensors
    traced element by element (SelecSLS, VoVNet) when it does not trace with them as one value."""
    concrete = concrete_arguments(module, args, kwargs)
    try:
        graph = trace_module(module, owner, autowrap_functions=autowrap_functions, concrete_args=concrete)
        propagate_shapes(module, graph, owner, args, kwargs)
        return graph
    except SurgeryError:
        listed = concrete_arguments(module, args, kwargs, lists=True)
        if listed == concrete:
            raise
    graph = trace_module(module, owner, autowrap_functions=autowrap_functions, concrete_args=listed)
    propagate_shapes(module, graph, owner, args, kwargs)
    return graph


def _nothing_found(model: nn.Module, skipped: list, untraced: list, units: str = "residual") -> SurgeryError:
    from .refusals import found_instead

    name = type(model).__name__
    if skipped or untraced:
        kind = {"residual": "residual sum", "concat": "concatenation", "plain": "unit"}.get(units, "unit")
        advice = (
            " A model whose blocks are already gated (add_se applied twice, EfficientNet, RegNetY, SE-ResNet) needs "
            "none; for the plain version, start from the model without attention (e.g. regnet_x instead of regnet_y)."
            if units == "residual" else ""
        )
        return no_unit(
            f"no {kind} of {name} can take an SE: {grouped(skipped, untraced)}.{advice}",
            f"no {kind} of {name} can take an SE: {found_instead(skipped, untraced)}",
        )
    if units == "residual":
        return no_unit(
            f"found no residual sum in {name}: no module adds two same-shape tensors. units='residual' puts SE only "
            "on residual units (x + F(x)); pass units='auto' for the paper's rule for plain and multi-branch "
            "networks. If a block was listed in leaf_modules=, drop it from there.",
            f"found no residual sum in {name}: no module adds two same-shape tensors",
        )
    wanted = {"concat": "no concatenation of parallel branches along channels",
              "plain": "no convolution followed by a non-linearity"}.get(
        units, "no residual sum, no concatenation of parallel branches and no convolution followed by a non-linearity")
    return no_unit(
        f"found no unit in {name} to put an SE on: {wanted}. If a block was listed in leaf_modules=, drop it from "
        "there; a model without convolutions (an MLP, a transformer) is no CNN.",
        f"found no unit in {name}: {wanted}",
    )


def _where_filter(where: Where, paper: dict[str, str]) -> Callable[[str], bool]:
    """``where=`` as a predicate on owners; an item that matches no owner is refused with the candidates."""
    if where is None:
        return lambda owner: True
    if callable(where):
        return where
    items = [where] if isinstance(where, (str, int)) else list(where)

    def matches(item: int | str, owner: str) -> bool:
        if isinstance(item, int):
            return paper_stage(paper[owner]) == item
        return owner == item or owner.startswith(item + ".") or paper[owner] == item

    for item in items:
        if not any(matches(item, o) for o in paper):
            stages = sorted({s for s in map(paper_stage, paper.values()) if s is not None})
            raise SurgeryError(
                f"where= item {item!r} matches no residual block. Blocks: "
                + ", ".join(f"{o or '<top>'} ({p})" for o, p in paper.items())
                + f"; stages: {stages}"
            )
    return lambda owner: any(matches(item, owner) for item in items)


def _select(
    units: dict[str, tuple[fx.Graph, list[Residual]]], where: Where, paper: dict[str, str]
) -> list[tuple[str, Skipped]]:
    """Keep the owners ``where`` selects (in place); returns the sums it left out."""
    keep = _where_filter(where, paper)
    excluded = [(owner, Skipped(unit.add, SkipKind.NOT_SELECTED, "where= leaves its block out"))
                for owner, (_, found) in units.items() if not keep(owner) for unit in found]
    for owner in [o for o in units if not keep(o)]:
        del units[owner]
    if not units:
        raise SurgeryError(
            f"where={where!r} excluded every residual block; candidates: "
            + ", ".join(f"{o or '<top>'} ({p})" for o, p in paper.items())
        )
    return excluded


def _drop_narrow(units: dict, config: SEConfig, skipped: list, strict: bool) -> None:
    """Leave out (in place, into ``skipped``) the units narrower than r; with ``strict``, refuse the first."""
    for owner, (graph, found) in list(units.items()):
        wide_enough = [unit for unit in found if config.se_layer is not None
                       or hidden_width(unit.channels, config.reduction, config.divisor) >= 1]
        for unit in found:
            if unit in wide_enough:
                continue
            if strict:
                raise SurgeryError(narrow_message(unit.channels, config.reduction, owner) + ".")
            reason = (
                f"the block has {unit.channels} channels, fewer than r={config.reduction} (C // r would be 0; pass a "
                "smaller reduction, divisor=8, or where= to leave it out)"
            )
            skipped.append((owner, Skipped(unit.add, SkipKind.NARROW, reason)))
        if wide_enough:
            units[owner] = (graph, wide_enough)
        else:
            del units[owner]


def _placements(
    units: dict[str, tuple[fx.Graph, list[Residual]]], config: SEConfig, modules: dict[str, nn.Module]
) -> tuple[dict[str, list[Placement]], list[tuple[str, Skipped]]]:
    """Each selected owner's SE places for the position, and the units it cannot place; raises if none is placed."""
    placed: dict[str, list[Placement]] = {}
    skipped: list[tuple[str, Skipped]] = []
    for owner, (graph, found) in units.items():
        others = other_paths(modules[owner], found)
        if others:
            skipped.extend((owner, Skipped(unit.add, SkipKind.OTHER_PATHS,
                                           f"its class computes the block in {', '.join(others)} too (timm's "
                                           "features_only / forward_intermediates call it), which would run without "
                                           "the SE; add_se edits only forward, so it leaves this block as it is"))
                           for unit in found)
            continue
        # SE-POST / PRE / Identity sit off the branch, where the gate rule cannot see them
        if se_children(modules[owner]):
            skipped.extend((owner, Skipped(unit.add, SkipKind.HOLDS_SE, "its block already holds an SE from add_se"))
                           for unit in found)
            continue
        for unit in found:
            _make_out_of_place(graph, unit.add)
        order = {node: i for i, node in enumerate(graph.nodes)}
        submodules = dict(modules[owner].named_modules())
        for unit in found:
            verdict = place(unit, config.position, submodules, order)
            if isinstance(verdict, Skipped):
                skipped.append((owner, verdict))
            else:
                placed.setdefault(owner, []).append(verdict)
    if skipped:
        logger.warning("add_se(position=%r) skipped %s", config.position, grouped(skipped))
    if not placed and all(skip.kind in (SkipKind.HOLDS_SE, SkipKind.OTHER_PATHS) for _, skip in skipped):
        raise SurgeryError(f"no residual sum can take an SE: {grouped(skipped)}")
    if not placed:
        raise SurgeryError(
            f"position={config.position!r} fits none of the selected residual blocks: {grouped(skipped)}. Pick "
            f"another position ({', '.join(map(repr, POSITIONS))}) or other blocks with where=."
        )
    return placed, skipped


def other_paths(module: nn.Module, found: list[Residual]) -> list[str]:
    """The methods of ``module``'s class other than ``forward`` (``forward_*``, but those ``forward`` calls) that call
    a layer of one of the ``found`` units' branches: another way through the block, which an SE put into ``forward``
    would miss."""
    branch = {n.target.split(".")[0] for unit in found for n in unit.path if n.op == "call_module"}
    base = vars(type(module)).get("_se_surgery_base", type(module))
    try:
        called = set(re.findall(r"self\.(forward_\w+)\(", inspect.getsource(base.forward)))
    except (OSError, TypeError):
        called = set()
    names = []
    for cls in type(module).__mro__:
        if cls is nn.Module or not issubclass(cls, nn.Module) or "_se_surgery_base" in vars(cls):
            continue
        for name, method in vars(cls).items():
            if not (name.startswith("forward_") and callable(method)) or name in names or name in called:
                continue
            try:
                source = inspect.getsource(method)
            except (OSError, TypeError):
                continue
            if any(re.search(rf"self\.{re.escape(child)}\b", source) for child in branch):
                names.append(name)
    return names


def _units(owner: str, placements: list[Placement], config: SEConfig, modules: dict, paper: dict) -> list[Unit]:
    """The owner's SE blocks: names free in the owner, paper names (a second SE gets ``_2``), widths, fusion."""
    names = _free_se_names(modules[owner], owner, len(placements))
    units = []
    for k, (p, name) in enumerate(zip(placements, names)):
        ours = config.se_layer is None
        hidden = hidden_width(p.channels, config.reduction, config.divisor) if ours else None
        fused = config.fuse and ours and _fusable(p, config.position)
        paper_name = paper[owner] + (f"_{k + 1}" if k else "")
        units.append(Unit(owner, name, paper_name, UnitKind.RESIDUAL, p.channels, hidden, config.position, fused, p))
    return units


def _skip(owner: str, skipped: Skipped, kind: SkipKind | None = None) -> Skip:
    return Skip(owner, skipped.add.name, kind or skipped.kind, skipped.reason)


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
    add.meta[WROTE_INTO] = mutated
    order = {n: i for i, n in enumerate(graph.nodes)}
    add.target = "add" if add.op == "call_method" else operator.add
    for user in [u for u in mutated.users if order[u] > order[add]]:
        user.replace_input_with(mutated, add)


def _fusable(p: Placement, position: str) -> bool:
    """Whether the standard SE of ``p`` can run fused with its sum: the branch feeds a plain two-operand add."""
    unit = p.residual
    return (
        position == "standard"
        and p.after is unit.branch
        and p.readers == (unit.add,)
        and len(unit.add.args) == 2
        and not unit.add.kwargs
        and set(unit.add.args) == {unit.branch, unit.skip}
    )


def _owners_with_fused_se(
    modules: dict[str, nn.Module], owners: list[str], leaves: set[str], skipped: list[tuple[str, Skipped]]
) -> list[str]:
    """Owners whose sums all run fused inside an SE of ours (so the probe saw no sum there), each fused sum added
    to ``skipped``: such an owner holds an SE already, and still counts when blocks are numbered."""
    holding = []
    for owner, module in modules.items():
        if owner in owners or owner in leaves or not runs_generated_forward(module) or not se_children(module):
            continue
        graph = trace_module(module, owner, concrete_args=none_arguments(module))
        ours = se_children(module)
        fused = [n for n in graph.nodes if n.op == "call_module" and n.target in ours and len(n.args) > 1]
        skipped.extend((owner, Skipped(n, SkipKind.HOLDS_SE, "its block already holds an SE from add_se"))
                       for n in fused)
        holding += [owner] if fused else []
    return holding


def _free_se_names(module: nn.Module, owner: str, count: int) -> list[str]:
    """The first ``count`` SE names (``se``, ``se_1``, ...) not already taken by a child of ``module``."""
    names, index = [], 0
    while len(names) < count:
        if getattr(module, se_name("", index), None) is None:
            names.append(se_name(owner, index))
        index += 1
    return names


def _describe(config: SEConfig) -> str:
    if config.se_layer is not None:
        return (f"{getattr(config.se_layer, '__name__', type(config.se_layer).__name__)} modules, "
                f"{config.position} position")
    width = "C // r" if config.divisor is None else f"C / r rounded to {config.divisor}"
    variant = [] if (config.squeeze, config.excitation) == ("avg", "sigmoid") else [
        f"{config.squeeze} squeeze, {config.excitation} gate"]
    return ", ".join([f"{config.position} SE", f"r = {config.reduction} (hidden {width})", *variant,
                      *([] if config.bias else ["no FC biases"]), f"{config.init} init"])


def _columns(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _table(p: Plan) -> str:
    """The plan as text: a header, one row per SE block, then the skipped sums and the untraceable owners."""
    lines = [f"{type(p.model).__name__}: {len(p.units)} SE block(s); {_describe(p.config)}"]
    rows = [("SE block", "paper", "unit", "C", "hidden", "fused")] + [
        (u.se_name, u.paper_name, u.kind.value, str(u.channels), "-" if u.hidden is None else str(u.hidden),
         "yes" if u.fused else "no") for u in p.units]
    lines += _columns(rows)
    if p.skipped:
        lines.append(f"skipped ({len(p.skipped)}):")
        lines += _columns([(s.owner or "<top>", s.node, s.kind.value, s.reason) for s in p.skipped])
    if p.untraceable:
        lines.append(f"left as they are, torch.fx cannot trace or run them ({len(p.untraceable)}):")
        lines += _columns([(u.owner or "<top>", u.class_name, str(u.error).split(". ")[0]) for u in p.untraceable])
    return "\n".join(lines)
