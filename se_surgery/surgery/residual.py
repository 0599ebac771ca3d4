"""The rule that tells a residual branch from its skip, on an fx graph. Pure: no module is changed here.

A residual sum adds two same-shape 4-D tensors. Operand order means nothing (torchvision's ResNet puts the branch
first, MobileNetV2 and RegNet second), so the rule looks at what lies between the operands' latest common ancestor
and each operand: the branch holds more learned layers (conv / linear) on its longest path, the skip at most one
(identity, a 1x1 projection + norm, or pool + conv). Ties, or two heavy operands, are not residual sums.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import SqueezeExcitation

__all__ = ["Residual", "Skipped", "find_sums", "classify_sum", "learned_layers"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
_MUL_METHODS = {"mul", "mul_", "div", "div_"}
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax, F.softmax}
_GATE_METHODS = {"sigmoid", "sigmoid_", "softmax"}
# Parameter-free modules a branch may end with after its last norm: the SE goes before them (paper's "standard SE").
_PASS_THROUGH = re.compile(r"drop|stochastic|identity", re.IGNORECASE)
_LAYER_SCALE = re.compile(r"layerscale", re.IGNORECASE)
# Attention / gating modules that make a branch "already gated" (torchvision, timm, common user names).
_GATE_MODULES = re.compile(
    r"squeeze|excit|(^|effective)se(layer|module|block)?$|eca(module)?$|cbam|globalcontext|selectivekernel|attention|attn",
    re.IGNORECASE,
)


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


@dataclass(frozen=True)
class Skipped:
    """A same-shape tensor sum that gets no SE, and why."""

    add: fx.Node
    reason: str


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
        name = type(module).__name__
        no_params = next(module.parameters(), None) is None
        if (no_params and _PASS_THROUGH.search(name)) or _LAYER_SCALE.search(name):
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


def _last_width(path: set[fx.Node], modules: dict[str, nn.Module], order: dict[fx.Node, int]) -> int | None:
    """Output width of the branch's last conv / linear layer (to catch channels-last N x H x W x C tensors)."""
    for node in sorted(path, key=order.__getitem__, reverse=True):
        if node.op == "call_module":
            layers = [m for m in modules[node.target].modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
            if layers:
                last = layers[-1]
                return last.out_channels if isinstance(last, nn.modules.conv._ConvNd) else last.out_features
    return None


def _is_gate(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return any(
            isinstance(m, SqueezeExcitation) or _GATE_MODULES.search(type(m).__name__)
            for m in modules[node.target].modules()
        )
    is_gate_fn = (node.op == "call_function" and node.target in _GATE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _GATE_METHODS
    )
    # A gate broadcasts over the tensor it scales (N x C x 1 x 1 against N x C x H x W); x * sigmoid(x) (swish) does not.
    return is_gate_fn and any(
        _shape(other) is not None and _shape(other) != _shape(node)
        for user in node.users
        for other in user.args
        if other is not node
    )


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
    if len(shape) != 4:
        return Skipped(add, f"a sum of {len(shape)}-D tensors (a transformer-style block?), SE needs N x C x H x W")
    common = (_ancestors(a) | {a}) & (_ancestors(b) | {b})
    if not common:
        return Skipped(add, "its operands share no input, so neither is a skip connection")
    root = max(common, key=order.__getitem__)

    def weight(n: fx.Node) -> int:
        if n.op == "call_module":
            return learned_layers(modules[n.target])
        name = getattr(n.target, "__name__", "")
        return int(n.op == "call_function" and name in {"conv1d", "conv2d", "conv3d", "linear"})

    (wa, path_a), (wb, path_b) = _heaviest_path(root, a, order, weight), _heaviest_path(root, b, order, weight)
    if wa == wb:
        return Skipped(add, f"both operands carry {wa} learned layer(s), so neither is the skip")
    (branch, path, heavy), (skip, light) = ((a, path_a, wa), (b, wb)) if wa > wb else ((b, path_b, wb), (a, wa))
    if light > 1:
        return Skipped(add, f"the lighter operand carries {light} learned layers; a skip has at most one")
    if any(_is_gate(n, modules) for n in path):
        return Skipped(add, "its branch already holds an SE / attention gate")
    width = _last_width(path, modules, order)
    if width is not None and width != shape[1]:
        return Skipped(add, f"its branch ends in {width} features but dim 1 has {shape[1]}: not N x C x H x W")
    insert, consumer = branch, add
    while (inner := _pass_through_input(insert, modules)) is not None and len(inner.users) == 1:
        if _shape(inner) != shape or inner not in path:
            break
        insert, consumer = inner, insert
    return Residual(add, branch, skip, insert, consumer, int(shape[1]), root, frozenset(path))
