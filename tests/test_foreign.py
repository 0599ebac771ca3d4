"""`--model NAME --weights FILE --data PATH`: SE networks of timm and torchvision, their weights files, the paper's
protocol. Random weights saved to a file and a small generated ImageNet-layout folder (no download)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from analysis.capture import find_gates, model_paper_names  # noqa: E402
from analysis.collected import resolve_classes  # noqa: E402
from analysis.errors import AnalysisError  # noqa: E402
from analysis.excitations import main  # noqa: E402
from analysis.foreign import imagenet_words, model_transform  # noqa: E402
from analysis.protocol import paper_blocks, sample_channels  # noqa: E402

from .helpers import Payload, one_line_error  # noqa: E402

CLASSES, PER_CLASS = ("cat", "dog", "fox"), 3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """PATH/val/<class>/*.png: 32x32 RGB images whose colour depends on the class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / "val" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 120, (32, 32, 3)) + 60 * np.eye(3, dtype=int)[k]
            Image.fromarray(pixels.astype(np.uint8)).save(root / "val" / name / f"{i}.png")
    return root


def saved_weights(model: torch.nn.Module, path: pathlib.Path) -> pathlib.Path:
    torch.save(model.state_dict(), path)
    return path


def reference_means(model: torch.nn.Module, gate: str, folder: pathlib.Path, transform) -> dict[str, np.ndarray]:
    """The independent reference: a hook on a gate named by hand, the images read by PIL, per-class means."""
    outputs = []
    handle = model.get_submodule(gate).register_forward_hook(lambda m, a, out: outputs.append(out.flatten(1)))
    means = {}
    model.eval()
    with torch.no_grad():
        for name in CLASSES:
            files = sorted((folder / "val" / name).glob("*.png"))
            model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
            means[name] = outputs.pop().double().mean(0).numpy()
    handle.remove()
    return means


def run_cli(args: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*args, "--no-progress"]) == 0
    return stdout.getvalue()


def eval_transform(crop: int, interpolation) -> v2.Compose:
    return v2.Compose([v2.Resize(crop, interpolation=interpolation, antialias=True), v2.CenterCrop(crop),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize(
    ("name", "build", "gate", "paper_name", "interpolation"),
    [
        ("timm:legacy_seresnet18", lambda: timm.create_model("legacy_seresnet18"), "layer4.1.se_module.sigmoid",
         "SE_5_2", v2.InterpolationMode.BICUBIC),
        ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), "features.1.block.1.scale_activation",
         "features.1.block.1", v2.InterpolationMode.BILINEAR),
    ],
    ids=["timm-legacy-senet", "torchvision-mobilenetv3"],
)
def test_foreign_model_with_its_weights_file(folder, tmp_path, name, build, gate, paper_name, interpolation) -> None:
    torch.manual_seed(1)
    model = build()
    weights = saved_weights(model, tmp_path / "weights.pth")
    out = tmp_path / "study"
    printed = run_cli(["--model", name, "--weights", str(weights), "--data", str(folder), "--crop", "32",
                       "--resize", "32", "--out", str(out)])
    assert "verdict by the mean class-to-all gap" in printed
    csv = pd.read_csv(out / "excitations.csv")
    block = gate.rpartition(".")[0]
    assert paper_name in set(csv["paper_name"]) and (csv[csv["class"] != "all"]["n"] == PER_CLASS).all()
    expected = reference_means(model, gate, folder, eval_transform(32, interpolation))
    for cls, mean in expected.items():
        got = csv[(csv["block"] == block) & (csv["class"] == cls)].sort_values("channel")["mean"].to_numpy()
        assert got == pytest.approx(mean, abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["weights"] == str(weights.resolve()) and summary["run"]["classes"] == list(CLASSES)


def test_default_preprocessing_is_the_models_own() -> None:
    image = Image.fromarray(np.full((300, 400, 3), 128, np.uint8))
    legacy = timm.create_model("legacy_seresnet18")
    x = model_transform("timm:legacy_seresnet18", legacy)(image)
    assert tuple(x.shape) == (3, 224, 224)  # timm's pretrained config: 224 crop of a 256 resize
    assert x[:, 0, 0].numpy() == pytest.approx((128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), abs=1e-4)
    weights = torchvision.models.EfficientNet_B3_Weights.DEFAULT
    effnet = model_transform("efficientnet_b3", torchvision.models.efficientnet_b3())
    assert tuple(effnet(image).shape) == (3, 300, 300) and weights.transforms().crop_size == [300]  # B3's own crop
    assert tuple(model_transform("efficientnet_b3", None, _override(crop=64))(image).shape) == (3, 64, 64)


def _override(**kw):
    from analysis.foreign import Preprocess

    return Preprocess(**kw)


def test_gates_and_names_of_every_se_kind() -> None:
    """torchvision SqueezeExcitation, timm SEModule / EffectiveSEModule / SqueezeExcite, the legacy SENet SEModule."""
    cases = {
        "regnet_y_400mf": (torchvision.models.regnet_y_400mf(), "scale_activation"),
        "efficientnet_b0": (torchvision.models.efficientnet_b0(), "scale_activation"),
        "timm:seresnet18": (timm.create_model("seresnet18"), "gate"),
        "timm:ese_vovnet19b_dw": (timm.create_model("ese_vovnet19b_dw"), "gate"),  # EffectiveSEModule
        "timm:mobilenetv3_small_050": (timm.create_model("mobilenetv3_small_050"), "gate"),  # SqueezeExcite
        "timm:legacy_seresnet18": (timm.create_model("legacy_seresnet18"), "sigmoid"),
    }
    for name, (model, child) in cases.items():
        gates = find_gates(model)
        assert gates and all(g.endswith("." + child) for g in gates.values()), name
    assert len(find_gates(cases["efficientnet_b0"][0])) == 16  # one SE per MBConv block
    assert list(model_paper_names(cases["timm:seresnet18"][0]).values())[-1] == "SE_5_2"
    assert model_paper_names(cases["regnet_y_400mf"][0]) == {}  # no ResNet-like stages: module names


def _error(capsys, args: list[str]) -> str:
    return one_line_error(main, capsys, args)


def test_wrong_and_hostile_weight_files(folder, tmp_path, capsys) -> None:
    base = ["--model", "mobilenet_v3_small", "--data", str(folder), "--out", str(tmp_path / "out")]
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": Payload(marker)}, evil)
    assert "refusing to run its code" in _error(capsys, [*base, "--weights", str(evil)])
    assert not marker.exists()
    wrong = saved_weights(torchvision.models.resnet18(), tmp_path / "resnet18.pth")
    err = _error(capsys, [*base, "--weights", str(wrong)])
    assert "missing features.0.0.weight" in err and "unexpected conv1.weight" in err and "more" in err
    head = torchvision.models.mobilenet_v3_small(num_classes=10)
    err = _error(capsys, [*base, "--weights", str(saved_weights(head, tmp_path / "head.pth"))])
    assert "wrong shape classifier.3.weight (10, 1024) vs (1000, 1024)" in err and "--num-classes" in err
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(wrong.read_bytes()[:4000])
    assert "damaged" in _error(capsys, [*base, "--weights", str(truncated)])
    assert "no weights file" in _error(capsys, [*base, "--weights", str(tmp_path / "missing.pth")])
    assert "unknown arch 'no_such_net'" in _error(capsys, ["--model", "no_such_net", *base[2:]])
    assert "needs --data" in _error(capsys, ["--model", "mobilenet_v3_small", "--out", str(tmp_path / "o")])


def test_weights_of_every_format_and_their_ema(folder, tmp_path, capsys) -> None:
    """The analysis reads what the trainer reads (se_surgery.train.weights): .safetensors, a torchvision-reference
    checkpoint with a Namespace under args and its EMA weights; --ema without EMA weights, or without --weights."""
    from safetensors.torch import save_file

    from analysis.foreign import build_foreign_model, load_weights

    torch.manual_seed(0)
    plain, ema = torchvision.models.mobilenet_v3_small().eval(), torchvision.models.mobilenet_v3_small().eval()
    x = torch.randn(1, 3, 32, 32)
    save_file(plain.state_dict(), tmp_path / "model.safetensors")
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": {"module." + k: v for k, v in plain.state_dict().items()}, "epoch": 3,
                "args": argparse.Namespace(model="mobilenet_v3_small", lr=0.1), "model_ema": {
                    "n_averaged": torch.tensor(7), **{"module." + k: v for k, v in ema.state_dict().items()}}}, ckpt)
    with torch.no_grad():
        for path, kw, want in [(tmp_path / "model.safetensors", {}, plain), (ckpt, {}, plain), (ckpt, {"ema": True},
                                                                                               ema)]:
            got = load_weights(build_foreign_model("mobilenet_v3_small"), path, **kw)
            assert torch.equal(got(x), want(x)), (path.name, kw)
    base = ["--model", "mobilenet_v3_small", "--data", str(folder), "--out", str(tmp_path / "out")]
    err = _error(capsys, [*base, "--weights", str(tmp_path / "model.safetensors"), "--ema"])
    assert "holds no EMA weights" in err and err.endswith("drop --ema")
    assert "--ema picks the EMA weights of a --weights file" in _error(capsys, [*base, "--ema"])
    assert "--ema only apply to --model" in _error(capsys, ["--ckpt", str(tmp_path / "best.pt"), "--ema"])


def test_imagenet_words_resolve_classes_of_a_standard_folder() -> None:
    wnids = [f"n{k:08d}" for k in range(1000)]
    words = imagenet_words(wnids)
    assert words is not None and words[1] == "goldfish" and imagenet_words(wnids[:10]) is None
    assert resolve_classes(["goldfish", "pug", "airliner", "cliff", "n00000007"], words, wnids) == [1, 254, 404, 972, 7]
    with pytest.raises(AnalysisError, match="unknown class 'dragon'.*tench, goldfish"):
        resolve_classes(["dragon"], words, wnids)


def test_paper_protocol_blocks_on_se_resnet50() -> None:
    from se_surgery import add_se

    model = add_se(torchvision.models.resnet50())
    gates = find_gates(model)
    paper = model_paper_names(model, gates)
    assert [paper[b] for b in paper_blocks(list(gates), paper)] == ["SE_2_3", "SE_3_4", "SE_4_6", "SE_5_1", "SE_5_2",
                                                                   "SE_5_3"]
    # a block's second SE (SE_<s>_<b>_2) belongs to its stage; names outside the grammar (SE_top) to none
    names = {"a": "SE_2_1", "b": "SE_2_1_2", "c": "SE_3_1", "d": "SE_top", "e": "layer9.se"}
    assert paper_blocks(list(names), names) == ["b", "c"]


def test_paper_protocol_channel_sampling_is_seeded_and_uniform() -> None:
    channels = {"layer1.2.se": 256, "layer4.2.se": 2048, "tiny.se": 16}
    a, b = sample_channels(channels, seed=0), sample_channels(channels, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in channels)
    assert not np.array_equal(a["layer4.2.se"], sample_channels(channels, seed=1)["layer4.2.se"])
    assert np.array_equal(a["layer1.2.se"], sample_channels({"layer1.2.se": 256}, seed=0)["layer1.2.se"])
    last = a["layer4.2.se"]
    assert len(last) == 50 == len(set(last)) and list(last) == sorted(last)
    assert list(a["tiny.se"]) == list(range(16))
    draws = np.concatenate([sample_channels({"x": 100}, seed=s)["x"] for s in range(400)])
    counts = np.bincount(draws, minlength=100)  # uniform: each channel drawn about 400 * 50 / 100 = 200 times
    assert counts.min() > 140 and counts.max() < 260


def test_paper_protocol_cli(folder, tmp_path) -> None:
    torch.manual_seed(0)
    weights = saved_weights(timm.create_model("legacy_seresnet18"), tmp_path / "w.pth")
    out = tmp_path / "paper"
    run_cli(["--model", "timm:legacy_seresnet18", "--weights", str(weights), "--data", str(folder), "--crop", "32",
             "--resize", "32", "--protocol", "paper", "--classes", "dog,fox", "--out", str(out)])
    facts = json.loads((out / "summary.json").read_text())["run"]
    assert facts["protocol"] == "paper" and facts["drawn_classes"] == ["dog", "fox"]
    assert facts["classes"] == list(CLASSES)  # the all-class curve is over every class of the split
    sampled = facts["sampled_channels"]
    assert list(sampled) == ["SE_2_2", "SE_3_2", "SE_4_2", "SE_5_1", "SE_5_2"]  # ResNet-18's last-of-stage + stage 5
    assert all(len(c) == 50 for c in sampled.values())
    again = tmp_path / "again"
    run_cli(["--model", "timm:legacy_seresnet18", "--weights", str(weights), "--data", str(folder), "--crop", "32",
             "--resize", "32", "--protocol", "paper", "--out", str(again)])
    assert json.loads((again / "summary.json").read_text())["run"]["sampled_channels"] == sampled
