"""The layer types the surgery recognises by name, in one registry, each entry with the reason it is there.

The residual rule and the positions need to know a few kinds of layer that no base class identifies across
torchvision, timm and users' code: an attention **gate** (a branch that has one is already gated), a **norm** (the
standard SE goes after a branch's last one), an **activation** (SE 3x3 and SE-POST go after it), a parameter-free
**pass-through** step (drop-path: the SE goes before it) and a **layer scale**; the analysis also needs to know
an **SE module** (one returning its input times a gate s, whose gate it records). Entries match a module's class name
by regular expression, or a class by ``isinstance``. Users add their own with :func:`register_layer_type`, as
timm's ``register_notrace_module`` lets them mark their modules. The gate entries are a shortcut: the residual rule
also knows an SE-style gate of any name by its structure (a tensor times a function of its own global pool).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Union

from torch import nn
from torchvision.ops import SqueezeExcitation

from ..errors import SurgeryError

__all__ = ["LayerKind", "LayerType", "register_layer_type", "layer_types", "is_layer"]


class LayerKind(enum.Enum):
    GATE = "gate"
    NORM = "norm"
    ACTIVATION = "activation"
    PASS_THROUGH = "pass-through"
    LAYER_SCALE = "layer scale"
    SE_MODULE = "SE module"


@dataclass(frozen=True)
class LayerType:
    """One registry entry: modules of ``kind`` are those whose class matches ``match``, for ``reason``."""

    kind: LayerKind
    match: Union[re.Pattern, type]
    reason: str

    def matches(self, module: nn.Module) -> bool:
        if isinstance(self.match, type):
            return isinstance(module, self.match)
        return self.match.search(type(module).__name__) is not None


def _name(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


_REGISTRY: list[LayerType] = [
    LayerType(LayerKind.GATE, SqueezeExcitation, "torchvision's SE (MobileNetV3, EfficientNet, RegNetY) and ours"),
    LayerType(LayerKind.GATE, _name(r"squeeze|excit"), "SE modules named for the paper (SqueezeExcite, ...)"),
    LayerType(LayerKind.GATE, _name(r"(^|effective)se(layer|module|block)?$"),
              "timm's SEModule / EffectiveSEModule and users' SELayer / SEBlock"),
    LayerType(LayerKind.GATE, _name(r"eca(module)?$"), "ECA-Net's channel attention (timm's EcaModule)"),
    LayerType(LayerKind.GATE, _name(r"cbam"), "CBAM's channel and spatial attention"),
    LayerType(LayerKind.GATE, _name(r"globalcontext"), "GCNet's global context block"),
    LayerType(LayerKind.GATE, _name(r"selectivekernel"), "SKNet's selective kernel, a gated sum of branches"),
    LayerType(LayerKind.GATE, _name(r"attention|attn"), "any attention module gates what it scales"),
    LayerType(LayerKind.NORM, _name(r"norm|^bn"), "BatchNorm2d, GroupNorm, LayerNorm2d, timm's BatchNormAct2d"),
    LayerType(LayerKind.ACTIVATION, _name(r"relu|silu|swish|gelu|mish|elu$|hardtanh|^act"),
              "activations outside torch.nn.modules.activation (timm's Swish, GELU, create_act layers)"),
    LayerType(LayerKind.PASS_THROUGH, _name(r"drop|stochastic|identity"),
              "drop-path / stochastic depth / identity: the SE goes before them, on the branch itself"),
    LayerType(LayerKind.LAYER_SCALE, _name(r"layerscale"), "a learned per-channel scale after the branch (ConvNeXt)"),
    LayerType(LayerKind.SE_MODULE, SqueezeExcitation, "torchvision's SE and ours (SELayer): input * scale_activation"),
    LayerType(LayerKind.SE_MODULE, _name(r"^(se|effectivese)module$"), "timm's SEModule and EffectiveSEModule"),
    LayerType(LayerKind.SE_MODULE, _name(r"^squeezeexcite(cl)?$"), "timm's EfficientNet / MobileNetV3 SqueezeExcite"),
]


def register_layer_type(kind: LayerKind | str, match: type | str, reason: str) -> LayerType:
    """Teach the surgery one of your layer types; returns the entry (it is checked before the built-in ones).

    Args:
        kind: ``"gate"``, ``"norm"``, ``"activation"``, ``"pass-through"``, ``"layer scale"`` or ``"SE module"``
            (or a LayerKind).
        match: a class (``isinstance``) or a regular expression matched against class names (case-insensitive).
        reason: why the entry is there, shown by :func:`layer_types`.

    Examples:
        >>> register_layer_type(
        ...     "gate", MyChannelGate, "our channel attention: a branch with it is gated"
        ... )  # doctest: +SKIP
    """
    try:
        kind = LayerKind(kind) if isinstance(kind, str) else kind
    except ValueError:
        raise SurgeryError(
            f"unknown layer kind {kind!r}: pass one of {', '.join(repr(k.value) for k in LayerKind)}"
        ) from None
    if not isinstance(kind, LayerKind):
        raise SurgeryError(f"kind must be a LayerKind or its name; got {kind!r}")
    if not (isinstance(match, type) or isinstance(match, str)):
        raise SurgeryError(f"match must be a class or a regular expression; got {match!r}")
    if not isinstance(reason, str) or not reason.strip():
        raise SurgeryError("register_layer_type needs a reason: say why this type is a " + kind.value)
    try:
        pattern = match if isinstance(match, type) else _name(match)
    except re.error as err:
        raise SurgeryError(
            f"match {match!r} is not a regular expression ({err}): pass a class or a valid pattern"
        ) from None
    entry = LayerType(kind, pattern, reason)
    _REGISTRY.insert(0, entry)
    return entry


def layer_types(kind: LayerKind | None = None) -> list[LayerType]:
    """The registry's entries (of one kind), users' first."""
    return [e for e in _REGISTRY if kind is None or e.kind is kind]


def is_layer(module: nn.Module, kind: LayerKind) -> bool:
    """Whether ``module``'s own class is registered as ``kind`` (its children are not looked at)."""
    return any(entry.matches(module) for entry in _REGISTRY if entry.kind is kind)
