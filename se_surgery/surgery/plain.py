"""The plain-chain rule (SENet Sec. 3.3: VGG and MobileNet) on an fx graph. Pure: no module is changed here.

The rule, checkable by hand on one block's forward:

1. An SE goes after the non-linearity that follows each convolution: ``conv -> (norm | dropout | identity)* ->
   activation``, the activation being an activation layer or function, or a norm-act module (timm's
   ``BatchNormAct2d``), whose own activation the SE then follows.
2. A depthwise convolution (``groups == in_channels > 1``) and the pointwise one after it are one unit, MobileNet's
   depthwise separable convolution: only the pointwise convolution's non-linearity gets an SE. In a network built
   of such units, they alone get one (its standard-convolution stem is no unit). This is what fits the paper's
   SE-MobileNet (Table 3: 4.2 M -> 4.7 M parameters, 569 -> 572 MFLOPs at r = 16: 13 SE).
3. A convolution that no non-linearity follows (a residual branch's last, a classifier) gets none, nor one whose
   non-linearity is an output or gate function (softmax, sigmoid) or feeds an SE / attention gate already.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from .concat import After
from .layer_types import LayerKind, is_layer
from .positions import _is_activation, _is_norm_or_pass_through, is_activation_module
from .residual import _shape, learned_layers
from .skips import SkipKind, Skipped

__all__ = ["plain_units", "norm_act_child", "pointwise_after_depthwise", "is_gate_module"]

_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d}
# output and gate non-linearities: an SE after a softmax would break its sum to 1, after a sigmoid gate double it
_NOT_NON_LINEARITIES = (nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin, nn.Sigmoid, nn.Hardsigmoid)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}


def _conv_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.modules.conv._ConvNd | None | bool:
    """The convolution ``node`` runs (a conv layer, or a conv + norm module with no activation), True for a
    functional convolution, None if it runs none."""
    if node.op == "call_function":
        return True if node.target in _CONV_FUNCTIONS else None
    if node.op != "call_module":
        return None
    module = modules[node.target]
    if isinstance(module, nn.modules.conv._ConvNd):
        return module
    inside = list(module.modules())
    convs = [m for m in inside if isinstance(m, nn.modules.conv._ConvNd)]
    if learned_layers(module) == 1 and convs and not any(is_activation_module(m) for m in inside):
        return convs[0]
    return None


def norm_act_child(module: nn.Module) -> str | None:
    """The name of a norm-act module's activation child (timm's ``BatchNormAct2d.act``), if ``module`` is one."""
    norm = is_layer(module, LayerKind.NORM) or isinstance(module, nn.modules.batchnorm._NormBase)
    if learned_layers(module) or not norm:
        return None
    act = getattr(module, "act", None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity) and is_activation_module(act):
        return "act"
    return None


def _is_depthwise(conv: nn.modules.conv._ConvNd | bool) -> bool:
    return isinstance(conv, nn.modules.conv._ConvNd) and conv.groups > 1 and conv.groups == conv.in_channels


def _passes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A step between a convolution and its non-linearity: a norm, drop-out or identity."""
    functional = node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS
    return _is_norm_or_pass_through(node, modules) or functional


def pointwise_after_depthwise(convs: list[nn.modules.conv._ConvNd]) -> set[int]:
    """The ids of the 1x1 convolutions that complete a depthwise separable one: ``convs`` in call order, each pointwise
    one reading as many channels as the depthwise convolution called just before it makes."""
    return {id(b) for a, b in zip(convs, convs[1:])
            if _is_depthwise(a) and not _is_depthwise(b) and all(k == 1 for k in b.kernel_size)
            and b.in_channels == a.out_channels}


def is_gate_module(module: nn.Module) -> bool:
    """An SE / ECA / CBAM-sized gate module (a registered gate with at most 3 learned layers), not a network whose
    class name reads like one (SqueezeNet)."""
    return is_layer(module, LayerKind.GATE) and learned_layers(module) <= 3


def _feeds_gate(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s output goes into an SE / attention gate module (a network with SE of its own)."""
    return any(user.op == "call_module" and is_gate_module(modules[user.target]) for user in node.users)


def plain_units(graph: fx.Graph, modules: dict[str, nn.Module],
                pointwise: set[int] = frozenset()) -> list[After | Skipped]:
    """The SE places of ``graph`` (one module's forward, shapes propagated): after each non-linearity that follows
    a convolution, but a depthwise one's; ``pointwise`` (ids from :func:`pointwise_after_depthwise`) marks the ones
    that end a depthwise separable convolution."""
    found = []
    for node in graph.nodes:
        conv = _conv_of(node, modules)
        if conv is None or _is_depthwise(conv):
            continue
        step = node
        while len(step.users) == 1:
            step = next(iter(step.users))
            module = modules[step.target] if step.op == "call_module" else None
            if isinstance(module, _NOT_NON_LINEARITIES):
                break
            child = norm_act_child(module) if module is not None else None
            if child is not None or _is_activation(step, modules):
                if _feeds_gate(step, modules):  # the chain has its own SE / attention after it
                    found.append(Skipped(step, SkipKind.GATED, "its non-linearity feeds an SE / attention gate "
                                                               "already"))
                    break
                shape = _shape(step)
                if shape is not None and len(shape) >= 3:
                    found.append(After(step, int(shape[1]), "plain", child, id(conv) in pointwise))
                break
            if not _passes(step, modules):
                break
    return found
