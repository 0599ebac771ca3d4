"""SE networks from torchvision and timm for the excitation study: the model, its weights file, its preprocessing.

``python -m analysis.excitations --model NAME [--weights FILE [--ema]] --data PATH`` studies any SE network without
retraining it: ``NAME`` is a ``torchvision.models`` name (EfficientNet, MobileNetV3 and RegNetY hold SE blocks) or
``timm:NAME`` (``timm:legacy_seresnet50``, the port of the paper's Caffe SE-ResNet-50, or ``timm:seresnet50``). The
architecture is built with random weights (nothing is downloaded) and ``FILE`` is read by
:func:`se_surgery.train.weights.read_weights`: a ``state_dict`` saved with ``torch.save``, a ``.safetensors`` file,
or a timm ``train.py``, torchvision-reference or se-surgery training checkpoint (``--ema``: its EMA weights), with
``weights_only=True``: a file that carries code is refused before anything of it runs.
The evaluation preprocessing is the model's own: timm's pretrained config (``resolve_data_config`` +
``create_transform``) or the torchvision weights' ``transforms()``, which is a recipe, not a download.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from analysis.errors import AnalysisError
from se_surgery.archs import split_arch

__all__ = ["Preprocess", "build_foreign_model", "imagenet_words", "load_weights", "model_transform"]

_WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class Preprocess:
    """Flags that override the model's own evaluation preprocessing; ``None`` keeps the model's value.

    Attributes:
        crop: Side of the centre crop the network sees (224 for most ImageNet models).
        resize: Shorter side the image is resized to before the crop (256 for the paper's 224 crop).
        mean: Per-channel mean in [0, 1] pixel units.
        std: Per-channel standard deviation in [0, 1] pixel units.
    """

    crop: int | None = None
    resize: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None


def build_foreign_model(name: str, *, num_classes: int = 1000) -> nn.Module:
    """The architecture ``name`` (torchvision name, ``timm:NAME`` or ``package.module:function``, which the user
    named and so is imported) with random weights, in eval mode.

    Raises:
        AnalysisError: unknown name, or timm missing for a ``timm:`` name.
    """
    from se_surgery.errors import TrainError
    from se_surgery.train.models import build_model

    try:
        model = build_model({"arch": name, "num_classes": num_classes, "surgery": None}, factory=name)
    except TrainError as err:
        raise AnalysisError(f"--model {name}: {err}") from None
    return model.eval()


def load_weights(model: nn.Module, path: str | Path, *, ema: bool = False) -> nn.Module:
    """Load the weights in ``path`` (any format :func:`~se_surgery.train.weights.read_weights` reads; ``ema``: the
    EMA weights of a training checkpoint) into ``model``, strict, wrapper prefixes such as ``module.`` stripped.

    Raises:
        CheckpointError: a missing, damaged or foreign file, one carrying code (refused, never run), one holding no
            state_dict, or (``ema``) no EMA weights.
        AnalysisError: keys or shapes that do not match the model (the first mismatches named).
    """
    from se_surgery.errors import CheckpointError
    from se_surgery.train import weights

    state = weights.read_weights(path, ema=ema)
    try:
        weights.load_weights(model, state, source=f"--weights {path}", fix="pass the --model these weights were "
                             "saved from (and --num-classes if its classifier is not 1000-way)")
    except CheckpointError as err:
        raise AnalysisError(str(err)) from None
    return model


def model_transform(name: str, model: nn.Module, overrides: Preprocess = Preprocess()) -> Callable:
    """The model's own evaluation transform (PIL image in, normalised tensor out), with ``overrides`` applied.

    timm models: their pretrained config through ``timm.data.resolve_data_config`` / ``create_transform``.
    torchvision models: ``get_model_weights(name).DEFAULT.transforms(...)`` (needs no download); a model without
    weights gets ImageNet's 256 -> 224 crop and statistics.
    """
    if split_arch(name)[0] == "timm":
        from timm.data import create_transform, resolve_data_config

        args: dict[str, Any] = {}
        cfg = resolve_data_config({}, model=model)
        crop = overrides.crop or cfg["input_size"][-1]
        if overrides.crop or overrides.resize:
            args["input_size"] = (3, crop, crop)
            args["crop_pct"] = crop / overrides.resize if overrides.resize else cfg["crop_pct"]
        if overrides.mean:
            args["mean"] = tuple(overrides.mean)
        if overrides.std:
            args["std"] = tuple(overrides.std)
        return create_transform(**resolve_data_config(args, model=model), is_training=False)
    from torchvision.models import ResNet50_Weights, get_model_weights

    try:
        preset = get_model_weights(name).DEFAULT.transforms
    except (ValueError, KeyError, AttributeError):  # no weights enum: ImageNet's 256 -> 224 crop and statistics
        preset = ResNet50_Weights.IMAGENET1K_V1.transforms
    kwargs = {k: v for k, v in (("crop_size", overrides.crop), ("resize_size", overrides.resize),
                                ("mean", overrides.mean), ("std", overrides.std)) if v is not None}
    if overrides.crop and not overrides.resize:
        kwargs["resize_size"] = round(overrides.crop * 256 / 224)  # keep the usual 256/224 ratio around a new crop
    return preset(**kwargs)


def imagenet_words(classes: Sequence[str]) -> list[str] | None:
    """ImageNet's category words (``goldfish``, ``pug``, ...) for a 1,000-class folder of WordNet ids in the standard
    (sorted) order, from torchvision's weights metadata (no download); ``None`` for any other folder."""
    if len(classes) != 1000 or not all(_WNID.fullmatch(c) for c in classes) or list(classes) != sorted(classes):
        return None
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
