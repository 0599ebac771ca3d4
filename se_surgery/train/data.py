"""Datasets and the SENet recipe's transforms.

Two sources, one call (:func:`build_dataset`):

* ``"digits"``: scikit-learn's bundled handwritten digits (1,797 real 8x8 greyscale images, 10 classes; no download),
  scaled to 32x32 RGB and split 80/20 into train/val with a fixed seed, stratified by class.
* a folder in ImageNet layout, ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (torchvision ``ImageFolder``);
  16-bit, transparent and other image modes load as 8-bit RGB at their own scale (:func:`to_rgb`).

The transforms are the paper's: random-size crop + horizontal flip for training; resize + centre crop for evaluation;
mean-channel subtraction only (no division by the standard deviation).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from ..errors import DataError

__all__ = ["DIGITS", "IMAGENET_MEAN", "ClassSubset", "Digits", "build_dataset", "build_transform", "default_mean",
           "to_rgb", "unwrap_worker_error"]

DIGITS = "digits"
# Per-channel ImageNet mean in [0, 1] pixel units (torchvision's weights use it): the mean that "mean-channel
# subtraction" removes when training on a folder, unless the recipe gives another.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
_SPLITS = ("train", "val")


class Digits(Dataset):
    """scikit-learn's handwritten digits as 32x32 RGB images, with a fixed, seeded, stratified train/val split.

    Args:
        split: ``"train"`` (1,437 images) or ``"val"`` (360 images).
        transform: Applied to each ``3 x 32 x 32`` ``uint8`` image tensor.
    """

    size = 32

    def __init__(self, split: str, transform=None) -> None:
        if split not in _SPLITS:
            raise DataError(f"unknown split {split!r} for the digits: use one of {_SPLITS}")
        images, targets = _digits_split(split)
        self.images = images
        self.targets: list[int] = targets.tolist()
        self.classes: list[str] = [str(d) for d in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


class ClassSubset(Dataset):
    """The images of some of ``dataset``'s classes (``--classes``), renumbered 0..k-1 in the dataset's own order.

    Args:
        dataset: A dataset with ``.classes`` and ``.targets`` (and ``.samples``, an image folder's, if it has them).
        classes: The class names to keep.
        data: The data's name, for the message.

    Raises:
        DataError: a name that is not one of ``dataset``'s classes.
    """

    def __init__(self, dataset: Dataset, classes: Sequence[str], data: str = "the data") -> None:
        unknown = [c for c in classes if c not in dataset.classes]
        if unknown:
            shown = ", ".join(dataset.classes[:12]) + (" ..." if len(dataset.classes) > 12 else "")
            raise DataError(f"--classes {' '.join(unknown)}: no such class in {data} (it has {shown}): pass names of "
                            "its class folders")
        wanted = set(classes)
        self.classes: list[str] = [c for c in dataset.classes if c in wanted]
        self.remap = {dataset.classes.index(c): i for i, c in enumerate(self.classes)}
        self.indices = [i for i, t in enumerate(dataset.targets) if t in self.remap]
        self.targets: list[int] = [self.remap[dataset.targets[i]] for i in self.indices]
        if hasattr(dataset, "samples"):
            self.samples = [(dataset.samples[i][0], t) for i, t in zip(self.indices, self.targets)]
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, target = self.dataset[self.indices[index]]
        return image, self.remap[target]


@functools.lru_cache(maxsize=2)
def _digits_split(split: str) -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    index = np.arange(len(bunch.target))
    train, val = train_test_split(index, test_size=0.2, random_state=0, stratify=bunch.target)
    chosen = np.sort(train if split == "train" else val)
    # Pixel values are 0..16; upsample bilinearly 4x to 32x32 so an unchanged ImageNet stem (stride 4) sees the
    # digits at their native 8x8 resolution, then replicate to three channels as the RGB models expect.
    small = torch.from_numpy(bunch.images[chosen]).float().unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(Digits.size, Digits.size), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, bunch.target[chosen]


def default_mean(data: str) -> tuple[float, float, float]:
    """The per-channel mean (in [0, 1]) to subtract: the digits' own training mean, else ImageNet's."""
    if data != DIGITS:
        return IMAGENET_MEAN
    images, _ = _digits_split("train")
    return tuple(round(float(m), 6) for m in images.float().mean(dim=(0, 2, 3)) / 255)


def build_transform(
    *,
    train: bool,
    input_size: int,
    resize: int | None = None,
    mean: Sequence[float],
    min_scale: float = 0.08,
    flip: bool = True,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """The recipe's transform: PIL image or ``uint8`` tensor in, mean-subtracted ``float32`` tensor out.

    Args:
        train: Random-size crop (area fraction in ``[min_scale, 1]``) + optional horizontal flip if True; otherwise
            resize the shorter side to ``resize`` and take the centre ``input_size`` crop.
        input_size: Side of the crop the network sees (224 in the paper).
        resize: Evaluation resize (256 in the paper); ``None`` keeps the paper's 256/224 ratio.
        mean: Per-channel mean in [0, 1] pixel units; subtracted, with no division by the std.
        min_scale: Smallest crop area fraction for training (0.08 is the Inception-style random-size crop).
        flip: Random horizontal flip for training.
        std: Per-channel std to divide by after the mean; ``None``: none (the paper's mean subtraction only).
    """
    if train:
        steps = [v2.RandomResizedCrop(input_size, scale=(min_scale, 1.0), antialias=True)]
        steps += [v2.RandomHorizontalFlip()] if flip else []
    else:
        resize = resize or round(input_size * 256 / 224)
        steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(input_size)]
    std = [1.0, 1.0, 1.0] if std is None else list(std)  # None: mean subtraction only, as in the paper
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), std)])


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB at the scale its mode means, whatever the mode.

    PIL's own ``convert("RGB")`` clips 16-bit images (``I;16``, ``I``) at 255, so nearly every pixel of a 16-bit PNG
    would read as white: those are scaled by 255/65535 instead (``I`` is read as 16-bit, what 16-bit PNGs and TIFFs
    decode to). ``F`` is read as [0, 1] if its values lie there, else as 0..255. Transparent images (``RGBA``,
    ``LA``, their premultiplied forms, a palette or grey/RGB image with a transparent colour) are composited onto
    white, as they are shown on a page; ``CMYK``, ``1``, ``L``, ``P``, ``YCbCr`` and the rest convert as PIL does.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            scale = 255.0 if values.size and np.nanmax(values) <= 1 else 1.0
        else:
            scale = 255.0 / 65535.0
        grey = np.clip(np.rint(np.nan_to_num(values * scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("La", "RGBa"):  # premultiplied alpha
        image = image.convert(mode.upper())
    elif mode in ("P", "PA", "L", "RGB") and ("transparency" in image.info or mode == "PA"):
        image = image.convert("RGBA")
    if image.mode in ("LA", "RGBA"):
        page = Image.new("RGB", image.size, (255, 255, 255))
        page.paste(image.convert("RGB"), mask=image.getchannel("A"))
        return page
    return image.convert("RGB")


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # the whole decode, inside the try: a truncated file is named here
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError: OSError
        raise DataError(f"cannot read image {path}: {e}; delete or replace the file") from None


def unwrap_worker_error(error: Exception) -> Exception:
    """``error`` as its own one line if a DataLoader worker re-raised it, else ``error`` itself.

    A worker process hands an exception back as ``type(error)("Caught ... in DataLoader worker process N. Original
    Traceback ...")``; the original message is the traceback's last line, after the exception's name.
    """
    text = str(error)
    if "Original Traceback" not in text:
        return error
    last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    _, sep, message = last.partition(f"{type(error).__name__}: ")
    return type(error)(message.strip() if sep else last.strip())


def build_dataset(
    data: str,
    split: str,
    *,
    input_size: int,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    train: bool | None = None,
    min_scale: float = 0.08,
    flip: bool = True,
    std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """A dataset with ``.classes`` (names) and ``.targets`` (class indices), transformed as the recipe says.

    Args:
        data: ``"digits"`` for the embedded digits, or a folder holding ``train/<class>/*`` and ``val/<class>/*``.
        split: ``"train"`` or ``"val"``.
        input_size: Crop side the network sees.
        resize: Evaluation resize (see :func:`build_transform`).
        mean: Per-channel mean to subtract; ``None`` means :func:`default_mean` of ``data``.
        train: Training (random) transforms; ``None`` means ``split == "train"``.
        min_scale: Smallest random-crop area fraction (training only).
        flip: Random horizontal flip (training only).
        std: Per-channel std to divide by (``None``: none, the paper's mean subtraction).
        classes: Keep these classes only (:class:`ClassSubset`); ``None``: all.

    Raises:
        DataError: The folder, a split, or a class folder is missing or empty; a class of ``classes`` is not in it.

    Examples:
        >>> val = build_dataset("digits", "val", input_size=32, resize=32)
        >>> len(val), val.classes[:3], tuple(val[0][0].shape)
        (360, ['0', '1', '2'], (3, 32, 32))
    """
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {_SPLITS}")
    transform = build_transform(
        train=split == "train" if train is None else train,
        input_size=input_size,
        resize=resize,
        mean=default_mean(data) if mean is None else mean,
        min_scale=min_scale,
        flip=flip,
        std=std,
    )
    dataset = _dataset(data, split, transform)
    return dataset if classes is None else ClassSubset(dataset, classes, data)


def _dataset(data: str, split: str, transform: v2.Compose) -> Dataset:
    if data == DIGITS:
        return Digits(split, transform)
    root = Path(data).expanduser()
    if not (root / split).is_dir():
        hint = f"{root} does not exist" if not root.exists() else f"{root} has no {split}/ folder"
        raise DataError(f"{hint}: pass --data a folder with train/<class>/* and val/<class>/* (ImageNet layout)")
    try:
        return datasets.ImageFolder(str(root / split), transform=transform, loader=_load_rgb)
    except FileNotFoundError as e:  # no class folder, or a class folder with no image
        raise DataError(f"{root / split}: {e}; put at least one image in every class folder") from None
