"""The rule that tells a residual branch from its skip, on an fx graph. Pure: no module is changed here.

The rule, checkable by hand on one block's forward:

1. A residual unit is a sum ``branch + skip`` of two same-shape channels-first tensors (N x C x L, N x C x H x W,
   N x C x D x H x W) that start from one input, the unit's input: the operands' latest common ancestor, or a
   forward argument that is itself the skip (timm's DLA passes its projected shortcut in as ``shortcut``). Counting
   learned layers (conv / linear) on the longest path from that input, the skip carries it forward through at most
   one (identity, a 1x1 projection + norm, pool + conv) and the branch through more. Operand order means nothing;
   ties and two heavy operands are not units.
2. The skip carries the *whole* input: a skip without a learned layer that is only a piece of it (one output of a
   split or chunk, or fewer channels) is not a skip. Res2Net's hierarchical sums between its channel splits and
   EfficientViT's cascaded attention heads are such inner sums, so a Res2Net bottleneck gets one SE. Likewise a
   sum lying on the branch of another unit of the same forward is not a unit of its own.
3. The branch must not already hold an SE / attention gate, and must be channels-first, which is told by structure,
   not by rank. For 4-D sums: a branch whose last learned layer is a linear map over the tensor's last dimension,
   with no permute / reshape / concatenation after it, is a channels-last N x H x W x C token MLP (Swin, MaxViT's
   partitions), whatever dim 1 holds; a branch ending in a convolution is channels-first whatever its last conv's
   width (GhostNet concatenates primary and cheap features). For sums of any other rank the branch's last learned
   layer must be a convolution (a Conv1d / Conv3d module or a functional conv) with no dimension moved after it: so
   a 1-D or 3-D ResNet's units count, and a transformer's N x L x C token sums (a linear map last) do not.
"""

from __future__ import annotations

import operator
import re
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layer_types import LayerKind, is_layer
from .skips import SkipKind, Skipped
from .tracing import _ShallowTracer

__all__ = ["Residual", "Skipped", "find_sums", "classify_sum", "residual_units", "learned_layers", "layout_name"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
_MUL_METHODS = {"mul", "mul_", "div", "div_"}
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax, F.softmax}
_GATE_METHODS = {"sigmoid", "sigmoid_", "softmax"}
_CONV_FUNCTIONS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                   "convolution"}
_LAYOUTS = {3: "N x C x L", 4: "N x C x H x W", 5: "N x C x D x H x W"}


def layout_name(rank: int) -> str:
    """The channels-first layout of a ``rank``-D tensor in words: N x C x L, N x C x H x W, N x C x D x H x W."""
    return _LAYOUTS.get(rank, "N x C x " + " x ".join(f"S{i}" for i in range(1, rank - 1)))


@dataclass(frozen=True)
class Residual:
    """A residual sum: ``add = branch + skip``; the SE scales ``insert_after``'s output on the way to ``add``."""

    add: fx.Node
    branch: fx.Node
    skip: fx.Node
    insert_after: fx.Node
    consumer: fx.Node  # the one user of ``insert_after`` on the branch path: it will read the SE output instead
    channels: int
    root: fx.Node | None = None  # the operands' latest common ancestor: the block's input as both sides see it
    path: frozenset[fx.Node] = frozenset()  # the branch's nodes after ``root``, up to ``branch``


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def _shape(node: object) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def find_sums(graph: fx.Graph) -> Iterator[tuple[fx.Node, fx.Node, fx.Node]]:
    """Yield ``(add, a, b)`` for every add of two node operands with the same (propagated) shape, of rank >= 3."""
    for node in graph.nodes:
        if not _is_add(node):
            continue
        a = node.args[0] if node.args else node.kwargs.get("input")
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        shape_a, shape_b = _shape(a), _shape(b)
        if shape_a is not None and shape_a == shape_b and len(shape_a) >= 3:
            yield node, a, b


def learned_layers(module: nn.Module) -> int:
    """Number of learned layers (convolutions and linear maps) inside ``module``, itself included."""
    return sum(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in module.modules())


def learned_weight(node: fx.Node, modules: dict[str, nn.Module]) -> int:
    """The learned layers graph node ``node`` runs: a module's (:func:`learned_layers`), or 1 for a functional
    convolution or linear map."""
    if node.op == "call_module":
        return learned_layers(modules[node.target])
    name = getattr(node.target, "__name__", "")
    return int(node.op == "call_function" and name in {"conv1d", "conv2d", "conv3d", "linear"})


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _heaviest_path(start: fx.Node, end: fx.Node, order: dict[fx.Node, int], weight: Callable[[fx.Node], int]):
    """Largest number of learned layers on any path start -> end, and the nodes strictly after start up to end."""
    between = {n for n in _ancestors(end) | {end} if start in _ancestors(n)}
    best = {start: 0}
    for n in sorted(between, key=order.__getitem__):
        best[n] = weight(n) + max(best[p] for p in n.all_input_nodes if p in best)
    return best.get(end, 0), between


def _depends_on_input(node: object) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return node.op == "placeholder" or any(n.op == "placeholder" for n in _ancestors(node))


def _pass_through_input(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """If ``node`` is a drop-path / layer-scale step, the branch tensor it scales; else None."""
    if node.op == "call_module":
        module = modules[node.target]
        no_params = next(module.parameters(), None) is None
        if (no_params and is_layer(module, LayerKind.PASS_THROUGH)) or is_layer(module, LayerKind.LAYER_SCALE):
            return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        return None
    target = getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and re.search(r"drop_path|stochastic_depth|dropout", target):
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    is_mul = (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MUL_METHODS
    )
    if is_mul and len(node.args) == 2:
        tensors = [a for a in node.args if _depends_on_input(a)]
        if len(tensors) == 1:  # x * gamma, gamma * x, x / keep_prob: one operand is a constant or a parameter
            return tensors[0]
    return None


CATS = {torch.cat, torch.concat, torch.concatenate}  # the concatenations (the multi-branch rule's, the probe's)
_CONCAT = {*CATS, torch.stack}
_REORDER = re.compile(r"permute|transpose|movedim|swapaxes|flatten|reshape|view|unflatten", re.IGNORECASE)


def _last_width(path: set[fx.Node], modules: dict[str, nn.Module], order: dict[fx.Node, int]) -> int | None:
    """Output width of the branch's last learned layer if it is a linear map acting on the tensor's last dimension
    (a channels-last token MLP); None when it is a convolution (channels-first by construction), or when the branch
    concatenates or moves dimensions after it (ConvNeXt's ``Linear`` then ``permute`` back to N x C x H x W).
    """
    for node in sorted(path, key=order.__getitem__, reverse=True):
        target = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and node.target in _CONCAT:
            return None
        if node.op in ("call_method", "call_function") and _REORDER.search(target):
            return None
        if node.op == "call_module":
            module = modules[node.target]
            inside = list(module.modules())
            learned = [i for i, m in enumerate(inside) if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
            if learned:
                last = inside[learned[-1]]
                reordered = any(_REORDER.search(type(m).__name__) for m in inside[learned[-1] + 1 :])
                return None if isinstance(last, nn.modules.conv._ConvNd) or reordered else last.out_features
            if _REORDER.search(type(module).__name__):
                return None
    return None


def _last_learned(nodes: set[fx.Node], modules: dict[str, nn.Module], order: dict[fx.Node, int], rank: int) -> str:
    """What decides the layout of the latest of ``nodes``, for a sum of ``rank``-D tensors: ``"conv"`` for a
    convolution of that rank (a Conv1d / Conv3d module or a functional conv) with no dimension moved after it,
    ``"linear"`` for a linear map over the last dimension, ``"reorder"`` for a permute / reshape after the last
    learned layer (or a convolution of another rank, so reshaped since), ``"none"`` without a learned layer.
    A concatenation is looked through: a concatenation of convolutions is channels-first (GhostNet)."""
    for node in sorted(nodes, key=order.__getitem__, reverse=True):
        target = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and target in _CONV_FUNCTIONS:
            shape = _shape(node)
            return "conv" if shape is not None and len(shape) == rank else "reorder"
        if node.op == "call_function" and target == "linear":
            return "linear"
        if node.op in ("call_method", "call_function") and _REORDER.search(target):
            return "reorder"
        if node.op == "call_module":
            inside = list(modules[node.target].modules())
            learned = [i for i, m in enumerate(inside) if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
            if learned:
                last = inside[learned[-1]]
                if any(_REORDER.search(type(m).__name__) for m in inside[learned[-1] + 1 :]):
                    return "reorder"
                if isinstance(last, nn.modules.conv._ConvNd):
                    return "conv" if len(last.kernel_size) == rank - 2 else "reorder"
                return "linear"
            if _REORDER.search(type(inside[0]).__name__):
                return "reorder"
    return "none"


def _not_channels_first(add: fx.Node, rank: int, seen: str) -> Skipped:
    """The skip of a ``rank``-D sum whose branch shows ``seen`` (from :func:`_last_learned`) instead of a conv."""
    layout = layout_name(rank)
    why = {
        "linear": f"whose branch ends in a linear map over the last dimension: transformer tokens, not {layout}",
        "reorder": f"whose branch moves dimensions (permute / reshape) after its last learned layer: not {layout}",
    }.get(seen, f"without a convolution on its operands: not a channels-first {layout} map")
    return Skipped(add, SkipKind.NOT_CHANNELS_FIRST, f"a sum of {rank}-D tensors {why}")


def _is_part(root: fx.Node, skip: fx.Node) -> bool:
    """Whether ``skip`` is one piece of ``root``: ``root`` is a split / chunk, or ``skip`` has fewer channels."""
    meta = root.meta.get("tensor_meta")
    if root.op != "placeholder" and isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # split outputs
        return True
    whole, piece = _shape(root), _shape(skip)
    return whole is not None and piece is not None and len(whole) == len(piece) >= 3 and piece[1] < whole[1]


def _is_gate(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` (on a branch) gates what it scales: a registered gate type (the shortcut), a module whose own
    forward multiplies a tensor by a function of that tensor's global pool (an SE of any name, as Hugging Face's
    ``RegNetSELayer``), such a multiplication in the graph itself, or a sigmoid / softmax broadcast over a tensor."""
    if node.op == "call_module":
        return any(is_layer(m, LayerKind.GATE) or _gates_by_structure(m) for m in modules[node.target].modules())
    if _pool_gated_mul(node, modules):
        return True
    is_gate_fn = (node.op == "call_function" and node.target in _GATE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _GATE_METHODS
    )
    # A gate broadcasts over the tensor it scales (N x C x 1 x 1 against N x C x H x W, N x C x 1 against N x C x L);
    # x * sigmoid(x) (swish) does not.
    return is_gate_fn and any(
        _shape(other) is not None and _shape(other) != _shape(node)
        for user in node.users
        for other in user.args
        if other is not node
    )


_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                   F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_REDUCTIONS = {"mean", "amax", "sum"}  # x.mean((2, 3)), torch.amax(x, (-2, -1)), ...
_SIGMOIDS = (nn.Sigmoid, nn.Hardsigmoid)


def _pools_to_one(module: nn.Module) -> bool:
    """An adaptive pool to 1 x ... x 1, or a parameter-free module holding one (timm's SelectAdaptivePool2d)."""
    if isinstance(module, _POOLS):
        size = module.output_size
        return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))
    return learned_layers(module) == 0 and any(_pools_to_one(m) for m in module.children())


def _arg(node: fx.Node, index: int, name: str) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _global_pool_input(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The tensor ``node`` pools globally (over every dimension after the channels'), or None if it is no such pool."""
    source = _arg(node, 0, "input")
    if not isinstance(source, fx.Node):
        return None
    if node.op == "call_module":
        return source if _pools_to_one(modules[node.target]) else None
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        size = _arg(node, 1, "output_size")
        return source if all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,))) else None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op in ("call_method", "call_function") and name in _REDUCTIONS:
        dims = _arg(node, 1, "dim")
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        # over the spatial dimensions, not the batch's or the channels' (CBAM's channel mean is no squeeze)
        return source if dims and all(type(d) is int and d not in (0, 1) for d in dims) else None
    return None


def _unreshaped(node: fx.Node) -> fx.Node:
    """``node`` before any flatten / view / reshape: ``x.flatten(2).mean(-1)`` pools ``x``."""
    while node.op in ("call_method", "call_function") and _REORDER.search(getattr(node.target, "__name__",
                                                                                   str(node.target))):
        if not node.args or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    return node


def _pool_gated_mul(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is ``x * g`` with ``g`` computed from a global pool of ``x`` itself: an SE's scaling."""
    is_mul = (node.op == "call_function" and node.target in _MUL_FUNCTIONS - {operator.truediv, torch.div}) or (
        node.op == "call_method" and node.target in {"mul", "mul_"}
    )
    if not is_mul or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    for x, g in (node.args, node.args[::-1]):
        pooled = {_global_pool_input(n, modules) for n in _ancestors(g) | {g}} - {None}
        if x in pooled or _unreshaped(x) in {_unreshaped(p) for p in pooled}:
            return True
    return False


def _gates_by_structure(module: nn.Module) -> bool:
    """Whether ``module``'s own forward is an SE-style gate whatever its class is called: it multiplies a tensor by
    a function of that tensor's global pool. Built-in torch.nn layers are none; a forward fx cannot trace counts as
    a gate when the module has a pool to 1 as a child and holds a sigmoid / hard sigmoid."""
    if type(module).__module__.startswith("torch.nn.") or not _may_pool(module):
        return False
    return _traced_gate(module)


def _code_names(code: types.CodeType) -> set[str]:
    """The global and attribute names a function's code (its inner functions included) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _may_pool(module: nn.Module) -> bool:
    """Whether ``module`` could pool globally in its own forward: it holds a pool to 1, or its forward's code names a
    reduction or an adaptive pool (``x.mean``, ``F.adaptive_avg_pool2d``). Only such modules are traced."""
    if any(_pools_to_one(c) for c in module.children()):
        return True
    code = getattr(type(module).forward, "__code__", None)
    return code is None or bool(_code_names(code) & (_REDUCTIONS | {f.__name__ for f in _POOL_FUNCTIONS}))


def _traced_gate(module: nn.Module) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _ShallowTracer().trace(module)
    except Exception:  # fx cannot follow this forward: judge it by what it holds
        pools = any(_pools_to_one(c) for c in module.children())
        return pools and any(isinstance(m, _SIGMOIDS) for m in module.modules())
    named = dict(module.named_modules())
    return any(_pool_gated_mul(n, named) for n in graph.nodes)


def classify_sum(
    add: fx.Node, a: fx.Node, b: fx.Node, modules: dict[str, nn.Module], order: dict[fx.Node, int]
) -> Residual | Skipped:
    """Decide whether ``add = a + b`` is a residual sum, and where its SE goes.

    Args:
        add: the add node; ``a`` and ``b`` its operands (any order), with ``meta["tensor_meta"]``.
        modules: the traced module's ``named_modules()``, to weigh ``call_module`` nodes.
        order: each node's position in the graph (a topological order).
    """
    shape = _shape(a)
    rank = len(shape)
    if rank != 4:  # only a convolution over dim 1 makes a 3-D or 5-D sum channels-first (the 4-D rule: step 3)
        seen = [_last_learned(_ancestors(n) | {n}, modules, order, rank) for n in (a, b)]
        if "conv" not in seen:
            return _not_channels_first(add, rank, max(seen, key=("none", "reorder", "linear").index))

    def weight(n: fx.Node) -> int:
        return learned_weight(n, modules)

    common = (_ancestors(a) | {a}) & (_ancestors(b) | {b})
    if common:
        root = max(common, key=order.__getitem__)
        (wa, path_a), (wb, path_b) = _heaviest_path(root, a, order, weight), _heaviest_path(root, b, order, weight)
    else:  # a skip handed in as a forward argument (DLA: ``forward(x, shortcut)``): the other side starts at an input
        arg, other = (a, b) if a.op == "placeholder" else (b, a)
        inputs = [n for n in _ancestors(other) if n.op == "placeholder"]
        if arg.op != "placeholder" or not inputs:
            return Skipped(add, SkipKind.NO_SHARED_INPUT,
                           "its operands share no input, so neither is a skip connection")
        root = max(inputs, key=lambda n: _heaviest_path(n, other, order, weight)[0])  # where the branch starts
        heavy = _heaviest_path(root, other, order, weight)
        (wa, path_a), (wb, path_b) = (((0, set()), heavy) if arg is a else (heavy, (0, set())))
    if wa == wb:
        return Skipped(add, SkipKind.TIE, f"both operands carry {wa} learned layer(s), so neither is the skip")
    (branch, path, heavy), (skip, light) = ((a, path_a, wa), (b, wb)) if wa > wb else ((b, path_b, wb), (a, wa))
    if rank != 4 and (seen := _last_learned(path, modules, order, rank)) != "conv":
        return _not_channels_first(add, rank, seen)
    if light > 1:
        return Skipped(add, SkipKind.HEAVY_SKIP,
                       f"the lighter operand carries {light} learned layers; a skip has at most one")
    if common and light == 0 and _is_part(root, skip):
        return Skipped(
            add,
            SkipKind.INNER_SUM,
            "its lighter operand is only a piece of the block's tensor (a channel split or chunk: an inner sum, as "
            "Res2Net's hierarchical splits), not the input carried forward",
        )
    if any(_is_gate(n, modules) for n in path):
        return Skipped(add, SkipKind.GATED, "its branch already holds an SE / attention gate")
    width = _last_width(path, modules, order) if rank == 4 else None
    if width is not None and width == shape[-1]:
        return Skipped(add, SkipKind.CHANNELS_LAST,
                       f"its branch ends in a linear map over the last dimension ({width} features; dim 1 has "
                       f"{shape[1]}): a channels-last N x H x W x C tensor, not N x C x H x W")
    insert, consumer = branch, add
    while (inner := _pass_through_input(insert, modules)) is not None and len(inner.users) == 1:
        if _shape(inner) != shape or inner not in path:
            break
        insert, consumer = inner, insert
    return Residual(add, branch, skip, insert, consumer, int(shape[1]), root, frozenset(path))


def residual_units(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[Residual | Skipped]:
    """Every same-shape sum of ``graph`` (one block's forward, shapes propagated), judged by the module's rule.

    A residual sum that lies on another one's branch, and not on its skip, is skipped (rule 2).
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    verdicts = [classify_sum(add, a, b, modules, order) for add, a, b in find_sums(graph)]
    units = [v for v in verdicts if isinstance(v, Residual)]

    def nested(inner: Residual) -> bool:
        return any(
            outer is not inner
            and inner.add in _ancestors(outer.branch) | {outer.branch}
            and inner.add not in _ancestors(outer.skip) | {outer.skip}
            for outer in units
        )

    return [
        Skipped(v.add, SkipKind.INNER_SUM,
                "it lies inside the branch of another residual sum of the same block (one SE per unit)")
        if isinstance(v, Residual) and nested(v)
        else v
        for v in verdicts
    ]
