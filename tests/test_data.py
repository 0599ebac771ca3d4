"""Datasets: the embedded digits, ImageFolder data, the paper's transforms, and clear errors for bad folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from se_surgery.errors import DataError
from se_surgery.train.data import Digits, build_dataset, default_mean


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = Digits("train"), Digits("val")
    assert (len(train), len(val)) == (1437, 360)
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert np.bincount(val.targets).min() >= 35  # stratified: every digit ~36 times
    rows = {bytes(img.numpy()) for img in train.images}
    assert sum(bytes(img.numpy()) in rows for img in val.images) <= 5  # (a few digits are pixel-identical)
    assert Digits("val").targets == val.targets


def test_eval_transform_subtracts_the_mean_only():
    data = build_dataset("digits", "train", input_size=32, resize=32, train=False)
    x = torch.stack([data[i][0] for i in range(len(data))])
    raw = Digits("train").images.float() / 255
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)  # the training mean is removed
    assert torch.allclose(x.std(), raw.std(), rtol=1e-4)  # and nothing divides by the std
    assert torch.allclose(torch.tensor(default_mean("digits")), raw.mean(dim=(0, 2, 3)), atol=1e-6)


def test_train_transform_is_random_and_sized():
    data = build_dataset("digits", "train", input_size=24, min_scale=0.3)
    torch.manual_seed(0)
    a = data[0][0]
    b = data[0][0]
    assert a.shape == (3, 24, 24) and not torch.equal(a, b)


def _folder(root, classes, per_class=2, size=40):
    for name in classes:
        for split in ("train", "val"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.random.default_rng(i).integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    root = _folder(tmp_path, ["cat", "dog"])
    train = build_dataset(str(root), "train", input_size=32)
    val = build_dataset(str(root), "val", input_size=32, resize=36, mean=[0.5, 0.5, 0.5])
    assert train.classes == val.classes == ["cat", "dog"] and train.targets == [0, 0, 1, 1]
    assert train[0][0].shape == val[0][0].shape == (3, 32, 32)


def test_bad_folders_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "nope"), "train", input_size=32)
    root = _folder(tmp_path / "d", ["cat"])
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*at least one image"):
        build_dataset(str(root), "train", input_size=32)


def test_unreadable_image_names_the_file(tmp_path):
    root = _folder(tmp_path, ["cat"])
    (root / "val" / "cat" / "0.png").write_bytes(b"not a png")
    val = build_dataset(str(root), "val", input_size=32)
    with pytest.raises(DataError, match=r"cannot read image .*0\.png"):
        val[0]
