"""What input a model expects, read from the model itself: its first convolution's dimensionality (N x C x L,
N x C x H x W or N x C x D x H x W) and channels, and the size it declares where it declares one (timm's
``pretrained_cfg``, a Hugging Face ``config``, an ``image_size`` / ``img_size`` attribute)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["first_conv", "input_channels", "input_dims", "declared_size", "probe_sizes", "suggested_shape",
           "example_call"]

# The probe sizes to try first, by dimensionality: cheap, and deep enough for a network that halves its input 5 times.
_SMALL = {1: (256,), 2: (64, 64), 3: (16, 32, 32)}
# Without a declared size, the one to try next: 1 s of 16 kHz audio, the ImageNet crop and Inception's, a Kinetics clip.
_USUAL: dict[int, list[tuple[int, ...]]] = {1: [(16000,)], 2: [(224, 224), (299, 299)], 3: [(16, 112, 112)]}


def first_conv(model: nn.Module) -> nn.modules.conv._ConvNd | None:
    """The model's first convolution (Conv1d / Conv2d / Conv3d, not transposed), in module order; None without one."""
    return next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed), None)


def input_channels(model: nn.Module) -> int | None:
    """The channel count ``model``'s first convolution expects, of any dimensionality (None without one)."""
    conv = first_conv(model)
    return conv.in_channels if conv is not None else None


def input_dims(model: nn.Module) -> int:
    """How many dimensions follow C in the model's input: its first convolution's (1, 2 or 3); 2 without one."""
    conv = first_conv(model)
    return len(conv.kernel_size) if conv is not None else 2


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        return tuple(value)
    return None


def _declared(model: nn.Module) -> tuple[int | None, tuple[int, ...] | None, int | None]:
    """(channels, sizes after C, frames) as the model declares them, each None where it does not."""
    for cfg in (getattr(model, "pretrained_cfg", None), getattr(model, "default_cfg", None)):  # timm
        size = _ints(cfg.get("input_size")) if isinstance(cfg, dict) else None
        if size is not None and len(size) >= 2:
            return size[0], size[1:], None
    config = getattr(model, "config", None)  # Hugging Face transformers
    if config is not None and not isinstance(config, (dict, nn.Module)):
        size = _ints(getattr(config, "image_size", None))
        if size is not None:
            channels = _ints(getattr(config, "num_channels", None))
            frames = _ints(getattr(config, "num_frames", None))
            return (channels[0] if channels else None), (size * 2 if len(size) == 1 else size), (
                frames[0] if frames else None)
    for attr in ("image_size", "img_size", "input_size"):  # torchvision's ViT, many research models
        size = _ints(getattr(model, attr, None))
        if size is not None:
            return None, (size * 2 if len(size) == 1 else size), None
    return None, None, None


def declared_size(model: nn.Module) -> tuple[int, ...] | None:
    """The input sizes after C the model declares, shaped for its dimensionality (e.g. ``(299, 299)``), or None.

    A 2-D size declared for a 3-D model gets its declared frame count in front (16 without one); a size of
    another length than the model's dimensionality is ignored.
    """
    _, size, frames = _declared(model)
    dims = input_dims(model)
    if size is None:
        return None
    if dims == 3 and len(size) == 2:
        size = (frames or _SMALL[3][0], *size)
    return size if len(size) == dims else None


def probe_sizes(model: nn.Module) -> list[tuple[int, ...]]:
    """The sizes after C to probe ``model`` at, in order: a small one, then the declared one, or the usual ones."""
    dims = input_dims(model)
    declared = declared_size(model)
    sizes = [_SMALL.get(dims, (16,) * dims), *([declared] if declared is not None else _USUAL.get(dims, []))]
    return list(dict.fromkeys(sizes))


def suggested_shape(model: nn.Module, channels: int | None = None) -> tuple[int, ...]:
    """A full input shape to suggest to a user: batch 2, ``channels`` (default the model's), the declared size or the
    usual one for the model's dimensionality (224 x 224 for a 2-D model)."""
    dims = input_dims(model)
    size = declared_size(model) or _USUAL.get(dims, [_SMALL.get(dims, (16,) * dims)])[0]
    declared_channels = _declared(model)[0]
    return (2, channels or input_channels(model) or declared_channels or 3, *size)


def example_call(model: nn.Module, channels: int | None = None) -> str:
    """``torch.randn(...)`` of :func:`suggested_shape`, as a user would type it."""
    return f"torch.randn({', '.join(str(n) for n in suggested_shape(model, channels))})"
