"""The multi-branch rule (SENet Sec. 3.3) on an fx graph: concatenations of parallel branches along channels. Pure.

The rule, checkable by hand on one block's forward:

1. **Inception.** A concatenation along dim 1 of parallel branches (at least one carries a learned layer, the
   others may pool; none is the block's input carried forward) gets one SE on its output: F_tr is "an entire
   Inception module" (Fig. 2). GoogLeNet, Inception-v3/v4, SqueezeNet's Fire modules and ShuffleNetV2's
   down-sampling units are such.
2. **Dense / shuffle.** A concatenation that carries the block's input, or a channel piece of it, forward unchanged
   beside new features is that network's identity path (DenseNet's dense connectivity, ShuffleNetV2's channel split):
   the SE goes on each operand that carries learned layers, before the merge, as on a residual branch (Fig. 3), so
   every later reader sees the recalibrated features and the carried ones are not scaled again.
3. A concatenation that is read only by another concatenation of the same forward (Inception-v3's InceptionE joins
   its 1x3 and 3x1 halves first) lies inside that unit: one SE per module. Features another operand was computed
   from are carried forward too, where they are a concatenation themselves or one of two operands (a dense block
   written ``x = cat([x, layer(x)], 1)`` in a loop).
4. Every operand that carries a learned layer must be channels-first by structure: its last learned layer is a
   convolution, with no reshape or permute after it (a ViT joining its class token to its patch tokens is no unit).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from .residual import _REORDER, CATS, _ancestors, _heaviest_path, _shape, learned_weight
from .skips import SkipKind, Skipped

__all__ = ["After", "concat_units", "channel_cat", "channels_first"]

_PIECES = {"chunk", "split", "tensor_split", "narrow", "getitem", "unbind"}
_CONV_FUNCTIONS = {"conv1d", "conv2d", "conv3d"}


@dataclass(frozen=True)
class After:
    """An SE on ``node``'s output (``channels`` wide); ``inside`` names the activation child of a norm-act module
    whose output it is (the SE then follows that child); ``kind`` is ``"plain"``, ``"inception"`` or ``"dense"``;
    ``separable``: a plain unit that ends a depthwise separable convolution."""

    node: fx.Node
    channels: int
    kind: str
    inside: str | None = None
    separable: bool = False


def channel_cat(node: fx.Node) -> list[fx.Node] | None:
    """The operands of ``node`` if it concatenates two or more channel-first tensors along dim 1, else None."""
    if node.op != "call_function" or node.target not in CATS:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = _shape(node)
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not isinstance(dim, int) or shape is None:
        return None
    if len(shape) < 3 or dim % len(shape) != 1 or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    return list(tensors)


def _is_identity(node: fx.Node) -> bool:
    """The block's input itself, or a channel piece of it (split / chunk / narrow / indexing of it only)."""
    while node.op != "placeholder":
        name = getattr(node.target, "__name__", str(node.target))
        if node.op not in ("call_method", "call_function") or name not in _PIECES or not node.args:
            return False
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
    return True


def channels_first(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the last learned layer on ``node``'s way is a convolution with no reshape / permute after it."""
    while True:
        if node.op == "call_module":
            inside = list(modules[node.target].modules())
            learned = [i for i, m in enumerate(inside) if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
            if learned:
                after = inside[learned[-1] + 1:]
                return (isinstance(inside[learned[-1]], nn.modules.conv._ConvNd)
                        and not any(_REORDER.search(type(m).__name__) for m in after))
            if _REORDER.search(type(modules[node.target]).__name__):
                return False
        elif node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            if _REORDER.search(name) or name == "linear":
                return False
            if name in _CONV_FUNCTIONS:
                return True
            operands = channel_cat(node)
            if operands is not None:
                return all(channels_first(op, modules) for op in operands)
        inputs = node.all_input_nodes
        if node.op in ("placeholder", "get_attr") or not inputs:
            return False
        node = inputs[0]


def _classify(cat: fx.Node, operands: list[fx.Node], modules: dict, order: dict) -> list[After] | Skipped:
    inputs = [n for n in cat.graph.nodes if n.op == "placeholder"]

    def carried(op: fx.Node) -> int:
        return max((_heaviest_path(p, op, order, lambda n: learned_weight(n, modules))[0] for p in inputs
                    if p in _ancestors(op) or p is op), default=0)

    # carried forward unchanged: the block's input (or a piece of it), or features another operand was computed from
    # (a dense block written as ``x = cat([x, layer(x)], 1)`` in a loop)
    def feeds_another(op: fx.Node) -> bool:
        return any(op in _ancestors(other) for other in operands if other is not op)

    identity = [op for op in operands if _is_identity(op) or (
        feeds_another(op) and (channel_cat(op) is not None or len(operands) == 2))]
    learned = [op for op in operands if carried(op) > 0 and op not in identity]
    if not all(channels_first(op, modules) for op in learned):
        return Skipped(cat, SkipKind.CHANNELS_LAST,
                       "an operand's last learned layer is no convolution over dim 1 (tokens or channels-last "
                       "features), so dim 1 holds no channels")
    if identity and learned:
        return [After(op, int(_shape(op)[1]), "dense") for op in dict.fromkeys(learned)]
    if not identity and learned:
        return [After(cat, int(_shape(cat)[1]), "inception")]
    return Skipped(cat, SkipKind.NO_BRANCHES,
                   "none of its operands carries a learned layer: no parallel branches (an input transform)")


def concat_units(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[After | Skipped]:
    """Every channel concatenation of ``graph`` (one block's forward, shapes propagated), judged by the module's rule:
    the SEs it gets (one per :class:`After`), or why none."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    verdicts: list[After | Skipped] = []
    for node in graph.nodes:
        operands = channel_cat(node)
        if operands is None:
            continue
        if node.users and all(channel_cat(user) is not None for user in node.users):
            verdicts.append(Skipped(node, SkipKind.INNER_CONCAT,
                                    "it is an operand of another concatenation of the block (one SE per module)"))
            continue
        found = _classify(node, operands, modules, order)
        verdicts += found if isinstance(found, list) else [found]
    return verdicts
