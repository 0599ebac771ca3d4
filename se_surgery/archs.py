"""Architecture names as every command takes them: a torchvision ``get_model`` name, or ``timm:NAME``."""

from __future__ import annotations

__all__ = ["TIMM_PREFIX", "split_arch"]

TIMM_PREFIX = "timm:"
"""An ``arch`` that starts with it names a timm model (``timm:legacy_seresnet50``); any other, a torchvision one."""


def split_arch(arch: str) -> tuple[str, str]:
    """``(source, name)`` of an architecture name: ``"timm:resnet50"`` -> ``("timm", "resnet50")``, ``"resnet50"``
    -> ``("torchvision", "resnet50")``."""
    if arch.startswith(TIMM_PREFIX):
        return "timm", arch[len(TIMM_PREFIX):]
    return "torchvision", arch
