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


def _png16_rgb(path, pixels):
    """Write ``pixels`` (H x W x 3 uint16) as a 48-bit PNG, which PIL cannot write itself."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_images_load_at_their_own_scale(tmp_path):
    from se_surgery.train.data import _load_rgb

    ramp = (np.arange(40 * 48).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # PIL reads it back as I;16
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "grey32.tif")  # mode I
    rgb16 = np.stack([ramp, ramp[::-1], np.full_like(ramp, 30000)], axis=-1)
    _png16_rgb(tmp_path / "rgb16.png", rgb16)
    expected = ramp / 65535
    for name, want in (("grey16.png", np.stack([expected] * 3, -1)), ("grey32.tif", np.stack([expected] * 3, -1)),
                       ("rgb16.png", rgb16 / 65535)):
        got = np.asarray(_load_rgb(str(tmp_path / name)), dtype=np.float64) / 255
        assert got.shape == (40, 48, 3) and np.abs(got - want).max() <= 1 / 255, name
    assert (np.asarray(_load_rgb(str(tmp_path / "grey16.png"))) == 255).mean() < 0.01  # not clipped to white

    # the same through the dataset: mean pixel of the evaluation tensor (no mean subtracted) at the 16-bit scale
    for split in ("train", "val"):
        (tmp_path / "d" / split / "a").mkdir(parents=True)
        Image.fromarray(ramp).save(tmp_path / "d" / split / "a" / "0.png")
    val = build_dataset(str(tmp_path / "d"), "val", input_size=40, resize=40, mean=[0, 0, 0])
    assert abs(float(val[0][0].mean()) - float(expected[:, 4:44].mean())) < 1 / 255


def test_transparent_palette_float_and_other_modes_load_as_rgb():
    from se_surgery.train.data import to_rgb

    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (200, 10, 10, 255))  # opaque: its own colour
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent: the white page
    assert [to_rgb(rgba).getpixel((x, 0)) for x in (0, 1)] == [(200, 10, 10), (255, 255, 255)]
    half = to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 128))).getpixel((0, 0))
    assert all(abs(c - 127) <= 1 for c in half)
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    assert [to_rgb(palette).getpixel((x, 0)) for x in (0, 1)] == [(10, 20, 30), (255, 255, 255)]
    assert to_rgb(Image.new("LA", (1, 1), (90, 255))).getpixel((0, 0)) == (90, 90, 90)
    assert to_rgb(Image.new("LA", (1, 1), (90, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))).getpixel((1, 0)) == (128, 128, 128)
    assert to_rgb(Image.fromarray(np.array([[0.0, 100.0]], np.float32))).getpixel((1, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("I;16B", (1, 1), 65535)).getpixel((0, 0)) == (255, 255, 255)
