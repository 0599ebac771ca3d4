"""What the surgery accepts from its caller, checked before any work: the model, the example input, the leaves."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..errors import SurgeryError
from .input_shape import example_call, input_channels, probe_sizes

__all__ = ["check_model", "check_example", "example_for", "default_examples", "unresized", "leaf_names",
           "brief"]


def brief(value: Any) -> str:
    """``repr(value)``, cut to 40 characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_model(model: Any, fn: str) -> None:
    """Refuse, in one line, anything but an eager ``nn.Module`` instance (None, a name, the class, a ScriptModule)."""
    example = "remove_se(add_se(model))" if fn == "remove_se" else f"{fn}(torchvision.models.resnet18())"
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
        if fn != "remove_se":
            example = f"{fn}(torchvision.models.get_model({model!r}))"
    else:
        got = f"{type(model).__name__} {brief(model)}" if model is not None else "None"
        got += ": pass the model itself"
    raise SurgeryError(f"{fn} needs an nn.Module instance, got {got}, e.g. {example}")


def check_example(example_input: Any, model: nn.Module) -> None:
    if example_input is None or isinstance(example_input, torch.Tensor):
        return
    raise SurgeryError(
        f"example_input must be a torch.Tensor the model accepts, got {type(example_input).__name__} "
        f"{brief(example_input)}: pass e.g. example_input={example_call(model)}, or leave it out"
    )


def default_examples(model: nn.Module) -> list[torch.Tensor]:
    """The probes to try on ``model``, in order, when the caller gives none: batch 2, its input channels, its dtype
    and device, shaped as its first convolution reads (N x C x L, N x C x H x W, N x C x D x H x W).

    A small one first (L = 256, 64 x 64 px, 16 x 32 x 32), then the size the model declares (timm's
    ``pretrained_cfg["input_size"]``, a Hugging Face ``config.image_size``); without one, the usual sizes of its
    dimensionality (224 then 299 px for images: torchvision's inception_v3 fails at 64 px and declares nothing).
    """
    ref = next(model.parameters(), None)
    ref = ref if ref is not None else next(model.buffers(), torch.empty(0))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    channels = input_channels(model) or 3
    # Batch 2 so a broadcast over the batch dimension never looks like a same-shape sum.
    return [torch.randn(2, channels, *size, device=ref.device, dtype=dtype) for size in probe_sizes(model)]


def example_for(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    """``example_input``, or the first of :func:`default_examples` (e.g. ``randn(2, C, 64, 64)`` for a 2-D CNN)."""
    if example_input is not None:
        return example_input
    return default_examples(model)[0]


@contextlib.contextmanager
def unresized(model: nn.Module, example: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model``'s own input resizing leaves ``example`` at its size; restored afterwards.

    A torchvision detection model's ``GeneralizedRCNNTransform`` scales every image to a short side of ``min_size``
    (800 px) before its backbone: a 64 px probe would run ResNet-50-FPN and the heads on two 800 x 800 images (over 10
    s on a CPU), and every block's recorded input with them. Where a residual sum is, and how wide, does not depend
    on the size, so each such transform is set to scale by 1 while the probe runs; one with a ``fixed_size`` (SSD's)
    is left as it is, its network being built for that size.
    """
    transforms = [m for m in model.modules() if isinstance(m, GeneralizedRCNNTransform) and m.fixed_size is None]
    saved = [(t.min_size, t.max_size) for t in transforms]
    if example.dim() >= 3:
        height, width = example.shape[-2:]
        for t in transforms:
            t.min_size, t.max_size = (min(height, width),), max(height, width)
    try:
        yield
    finally:
        for t, (min_size, max_size) in zip(transforms, saved):
            t.min_size, t.max_size = min_size, max_size


def leaf_names(model: nn.Module, leaf_modules: Sequence[str | type]) -> set[str]:
    """The module names ``leaf_modules`` (names or types) stands for; unknown names refused."""
    names = {n for n in leaf_modules if isinstance(n, str)}
    types = tuple(t for t in leaf_modules if isinstance(t, type))
    known = dict(model.named_modules())
    unknown = sorted(n for n in names if n not in known)
    if unknown:
        raise SurgeryError(f"leaf_modules names {unknown} are not modules of {type(model).__name__}")
    return names | {n for n, m in known.items() if types and isinstance(m, types)}
