"""What SE to put in: one frozen, validated :class:`SEConfig` that travels from the caller to the built blocks.

``add_se``'s keywords, the trainer's flags (defaults and choice lists) and a checkpoint's ``model_config`` all come
from this one dataclass, so a default or an allowed value is written once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from torch import nn

from ..errors import SurgeryError
from .positions import POSITIONS, Position
from .se_module import EXCITATIONS, SQUEEZES, Excitation, Squeeze

__all__ = ["SEConfig", "INITS", "Init", "SELayerFactory"]

Init = Literal["he", "identity"]
INITS: tuple[str, ...] = ("he", "identity")
SELayerFactory = Callable[[int], nn.Module]


def _choice(default: str, choices: tuple[str, ...], help: str) -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


@dataclass(frozen=True)
class SEConfig:
    """The SE block and where it sits, SENet's design space (Sec. 6, Tables 10-16); the defaults are the paper's SE.

    Attributes:
        reduction: the reduction ratio r; the excitation's hidden width is C // r (Table 10).
        position: ``"standard"`` (branch, before the sum, Fig. 5b), ``"pre"``, ``"post"``, ``"identity"`` (Table 14)
            or ``"3x3"`` (after the branch's spatial convolution, Table 15).
        squeeze: z = global ``"avg"`` pooling, ``"max"`` pooling (Table 11) or ``"none"`` (NoSqueeze, Table 16).
        excitation: the gate sigma: ``"sigmoid"``, ``"tanh"`` or ``"relu"`` (Table 12).
        bias: biases in the two FC layers (the released models, timm) or none (the paper's ablations).
        init: ``"he"`` (the paper's, from scratch) or ``"identity"`` (gates start at 1: a pretrained network's
            outputs are unchanged when fine-tuning starts; needs ``bias``).
        divisor: round the hidden width C / r to a multiple of it, never below it (timm's ``make_divisible``);
            None: C // r, the paper's width.
        fuse: run the standard SE and its residual sum as one ``skip + u * s`` (the Caffe SENet's Axpy layer).
        se_layer: instead of :class:`~.se_module.SELayer`, any callable ``channels -> nn.Module`` that maps its input
            to the same shape (timm's ``EcaModule``); ``reduction``, ``squeeze``, ``excitation``, ``bias`` and
            ``init`` then do not apply.
    """

    reduction: int = field(default=16, metadata={"help": "SE reduction ratio r (Table 10)"})
    position: Position = _choice("standard", POSITIONS, "where the SE sits in each unit (Fig. 5, Tables 14-15)")
    squeeze: Squeeze = _choice("avg", tuple(SQUEEZES), "squeeze: global avg or max pooling, or none (Tables 11, 16)")
    excitation: Excitation = _choice("sigmoid", tuple(EXCITATIONS), "excitation gate (Table 12)")
    bias: bool = field(default=True, metadata={"help": "biases in the SE's two FC layers"})
    init: Init = _choice("he", INITS, "SE weight init: he (the paper's) or identity (gates start at 1)")
    divisor: int | None = field(default=None, metadata={"help": "round C / r to a multiple of this (timm: 8)"})
    fuse: bool = field(default=True, metadata={"help": "fuse the standard SE with its residual sum"})
    se_layer: SELayerFactory | None = field(default=None, metadata={"help": "a callable channels -> nn.Module"})

    def __post_init__(self) -> None:
        def positive_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if not positive_int(self.reduction):
            raise SurgeryError(f"reduction must be an integer >= 1 (the paper's r, default 16); got {self.reduction!r}")
        for name, allowed in self.choices().items():
            if getattr(self, name) not in allowed:
                raise SurgeryError(
                    f"{name} must be one of {', '.join(map(repr, allowed))}; got {getattr(self, name)!r}"
                )
        for name in ("bias", "fuse"):
            if not isinstance(getattr(self, name), bool):
                raise SurgeryError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.divisor is not None and not positive_int(self.divisor):
            raise SurgeryError(
                f"divisor must be None or an integer >= 1 (timm rounds SE widths to 8); got {self.divisor!r}"
            )
        if self.se_layer is not None and not callable(self.se_layer):
            raise SurgeryError(
                f"se_layer must be a callable channels -> nn.Module (a class such as timm.layers.EcaModule, or a "
                f"lambda); got {self.se_layer!r}"
            )
        if self.init == "identity" and not self.bias and self.se_layer is None:
            raise SurgeryError(
                "init='identity' opens the gates through fc2's bias, so it needs bias=True (without biases every gate "
                "would start at sigma(0): half the branch for sigmoid, none of it for tanh and relu)"
            )

    @classmethod
    def choices(cls) -> dict[str, tuple[str, ...]]:
        """Field name -> its allowed values, for the fields that have a fixed list (flags' ``choices=``)."""
        return {f.name: f.metadata["choices"] for f in dataclasses.fields(cls) if "choices" in f.metadata}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Field name -> default value."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SEConfig:
        """A validated config from plain data (a checkpoint's ``model_config["surgery"]``); unknown keys refused."""
        unknown = sorted(set(values) - set(cls.defaults()))
        if unknown:
            raise SurgeryError(f"SEConfig has no option(s) {unknown}; its options are {', '.join(cls.defaults())}")
        return cls(**values)

    def to_dict(self, *, changed_only: bool = False) -> dict[str, Any]:
        """Plain data (for a checkpoint's config); ``changed_only``: just the fields that differ from the defaults.

        Raises:
            SurgeryError: the config holds an ``se_layer`` callable, which plain data cannot hold.
        """
        if self.se_layer is not None:
            raise SurgeryError("an SEConfig with se_layer= cannot be written as plain data (a callable is code)")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "se_layer"}
        if changed_only:
            defaults = self.defaults()
            values = {k: v for k, v in values.items() if v != defaults[k]}
        return values

    def replace(self, **changes: Any) -> SEConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)
