"""`python -m analysis.excitations` end to end on a checkpoint trained in the test, and its refusals."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from analysis.excitations import build_parser, main, resolve_study, run  # noqa: E402
from analysis.removal import evaluate  # noqa: E402

from .helpers import Payload, one_line_error  # noqa: E402

PER_CLASS = 4
FIGURES = ("fig6", "fig7", "specificity")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
    """An SE-ResNet-18 trained for one step of 64 digits by the trainer's Python API (seconds, not a minute)."""
    from se_surgery.train import get_recipe, train

    run = tmp_path_factory.mktemp("run")
    train(get_recipe(epochs=1, num_samples=64, batch_size=64, workers=0, eval_batch_size=360), run, progress=False)
    return run / "best.pt"


@pytest.fixture(scope="module")
def study(ckpt, tmp_path_factory) -> tuple[pathlib.Path, str]:
    out = tmp_path_factory.mktemp("study")
    args = ["--ckpt", str(ckpt), "--per-class", str(PER_CLASS), "--out", str(out), "--ablate", "all", "--no-progress"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    return out, stdout.getvalue()


def test_cli_writes_every_file_with_sensible_content(study) -> None:
    out, printed = study
    assert "SE_5_2" in printed and "removed" in printed and "wrote" in printed  # the closing table
    assert "gap(s)" in printed and "verdict by the mean class-to-all gap" in printed
    csv = pd.read_csv(out / "excitations.csv")
    assert list(csv.columns) == ["block", "paper_name", "depth", "class", "channel", "n", "mean", "std"]
    assert csv["block"].nunique() == 8 and csv["paper_name"].iloc[-1] == "SE_5_2" and csv["depth"].max() == 8
    per_class = csv[csv["class"] != "all"]
    assert set(per_class["class"].astype(str)) == {str(k) for k in range(10)} and (per_class["n"] == PER_CLASS).all()
    assert (csv[csv["class"] == "all"]["n"] == 10 * PER_CLASS).all()
    assert csv["mean"].between(0, 1).all() and (csv["std"] >= 0).all()
    channels = csv.groupby("block")["channel"].max().add(1).sum()
    assert len(csv) == 11 * channels  # ten classes + the all-class rows, for every channel of every block

    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["images_per_class"] == {str(k): PER_CLASS for k in range(10)}
    assert [b["paper_name"] for b in summary["blocks"]][:2] == ["SE_2_1", "SE_2_2"]
    for block in summary["blocks"]:
        assert 0 <= block["eta2"] <= 1 and 0 <= block["saturated_share"] <= 1 and 0 <= block["js_mean"] <= 1
        assert block["anova_p"] is None or 0 <= block["anova_p"] <= 1
        assert 0 <= block["gap"] <= block["gap_max"] <= 1 and block["verdict"] in printed
        assert block["verdict"] != "class-specific" or block["gap"] >= 0.05  # never on indistinguishable curves
    assert [a["variant"] for a in summary["ablation"]] == ["intact", "removed", "fixed"]

    for stem in FIGURES:
        image = mpimg.imread(out / f"{stem}.png")
        assert image.shape[1] >= 1000 and image.std() > 0.05
        assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF")


def test_ablating_every_block_gives_the_base_models_accuracy(ckpt, study) -> None:
    out, _ = study
    ablation = pd.read_csv(out / "ablation.csv").set_index("variant")
    # the reference: a plain torchvision ResNet-18 holding the checkpoint's weights without the SE ones
    from se_surgery.train.data import build_dataset

    payload = torch.load(ckpt, weights_only=True)
    cfg = payload["model_config"]
    base = torchvision.models.resnet18(num_classes=10)
    base.load_state_dict({k: v for k, v in payload["model"].items() if ".se." not in k})
    val = build_dataset(cfg["data"], "val", input_size=cfg["input_size"], resize=cfg["resize"], mean=cfg["mean"])
    first = [i for k in range(10) for i in [j for j, t in enumerate(val.targets) if t == k][:PER_CLASS]]
    top1, top5, n = evaluate(base, DataLoader(Subset(val, sorted(first)), batch_size=128))
    assert ablation.loc["removed", "images"] == n == 10 * PER_CLASS
    assert ablation.loc["removed", "top1"] == pytest.approx(top1)
    assert ablation.loc["removed", "top5"] == pytest.approx(top5)
    assert ablation.loc["removed", "params"] == sum(p.numel() for p in base.parameters())
    assert ablation.loc["removed", "se_overhead_pct"] == 0 < ablation.loc["intact", "se_overhead_pct"]


def _one_line_error(capsys, args: list[str]) -> str:
    return one_line_error(main, capsys, args)


def test_pickle_payload_is_refused_and_never_runs(tmp_path, capsys) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": Payload(marker)}, evil)
    err = _one_line_error(capsys, ["--ckpt", str(evil), "--out", str(tmp_path / "out")])
    assert "refusing to run its code" in err
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the control: a loader that trusts the file does run the payload
    assert marker.exists()


def test_bad_checkpoints_give_one_line_errors(ckpt, tmp_path, capsys) -> None:
    out = ["--out", str(tmp_path / "out")]
    assert "no checkpoint at" in _one_line_error(capsys, ["--ckpt", str(tmp_path / "missing.pt"), *out])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    assert "damaged" in _one_line_error(capsys, ["--ckpt", str(truncated), *out])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert "not an se-surgery checkpoint" in _one_line_error(capsys, ["--ckpt", str(foreign), *out])
    payload = torch.load(ckpt, weights_only=True)
    payload["model_config"]["surgery"] = None
    payload["model"] = {k: v for k, v in payload["model"].items() if ".se." not in k}
    plain = tmp_path / "plain.pt"
    torch.save(payload, plain)
    assert "no SE block" in _one_line_error(capsys, ["--ckpt", str(plain), *out])


def test_bad_names_and_outputs_give_one_line_errors(ckpt, tmp_path, capsys) -> None:
    base = ["--ckpt", str(ckpt), "--out", str(tmp_path / "out")]
    err = _one_line_error(capsys, [*base, "--classes", "3,goldfish"])
    assert "unknown class 'goldfish'" in err and "0, 1, 2" in err
    err = _one_line_error(capsys, [*base, "--blocks", "SE_5_2,SE_9_9"])
    assert "SE_9_9" in err and "SE_2_1, SE_2_2" in err
    assert "SE_7_1" in _one_line_error(capsys, [*base, "--ablate", "SE_7_1"])
    assert "--per-class 0" in _one_line_error(capsys, [*base, "--per-class", "0"])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # --out is checked first: with a missing checkpoint too, the error is about --out
    err = _one_line_error(capsys, ["--ckpt", str(tmp_path / "missing.pt"), "--out", str(blocker / "sub")])
    assert "cannot write to --out" in err


def test_train_split_is_captured_with_the_evaluation_transforms(ckpt, tmp_path) -> None:
    """--split train: the same numbers as a capture of the training images through the evaluation transform."""
    from analysis import capture_excitations
    from se_surgery.train.checkpoint import load_checkpoint
    from se_surgery.train.data import build_dataset

    payload = torch.load(ckpt, weights_only=True)  # zero-init residual BNs: after one step the gates barely vary
    payload["model"] = {k: torch.ones_like(v) if k.endswith("bn2.weight") else v for k, v in payload["model"].items()}
    ckpt = tmp_path / "varied.pt"
    torch.save(payload, ckpt)
    out = tmp_path / "train-split"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--ckpt", str(ckpt), "--split", "train", "--classes", "3", "--per-class", "3",
                     "--blocks", "SE_5_2", "--out", str(out), "--no-progress"]) == 0
    got = pd.read_csv(out / "excitations.csv")
    got = got[got["class"].astype(str) == "3"]["mean"].to_numpy()
    model, info = load_checkpoint(ckpt)
    cfg = info["model_config"]
    train = build_dataset(cfg["data"], "train", input_size=cfg["input_size"], resize=cfg["resize"], mean=cfg["mean"],
                          train=False)
    first = [i for i, t in enumerate(train.targets) if t == 3][:3]
    stats = capture_excitations(model, DataLoader(Subset(train, first), batch_size=8), blocks=["SE_5_2"])
    assert got == pytest.approx(stats.mean("SE_5_2", 3), abs=1e-6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """PATH/val/<class>/*.png: three classes of 32x32 RGB images."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k, name in enumerate(("cat", "dog", "fox")):
        (root / "val" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 120, (32, 32, 3)) + 60 * np.eye(3, dtype=int)[k]
            Image.fromarray(pixels.astype("uint8")).save(root / "val" / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--workers", "-2"], "--workers -2 must be 0 or more: pass e.g. --workers 4"),
        (["--std", "0", "0", "0"], "--std 0 0 0 must be three positive finite numbers"),
        (["--std", "0.2", "-0.1", "0.2"], "--std 0.2 -0.1 0.2 must be three positive finite numbers"),
        (["--std", "nan", "1", "1"], "--std nan 1 1 must be three positive finite numbers"),
        (["--mean", "inf", "0", "0"], "--mean inf 0 0 must be three finite numbers: pass e.g. --mean 0.485"),
        (["--crop", "0"], "--crop 0 must be a positive integer: pass e.g. --crop 224"),
        (["--resize", "0"], "--resize 0 must be a positive integer: pass e.g. --resize 256"),
        (["--num-classes", "0"], "--num-classes 0 must be a positive integer: pass e.g. --num-classes 1000"),
        (["--per-class", "0"], "--per-class 0 must be a positive integer"),
        (["--batch-size", "-1"], "--batch-size -1 must be a positive integer"),
        (["--seed", "-1"], "--seed -1 must be 0 or more"),
    ],
)
def test_numeric_flags_are_refused_before_any_model_or_data(folder, tmp_path, capsys, monkeypatch, flags, expected):
    import analysis.excitations as cli

    def never(*args, **kwargs):
        raise AssertionError("a model was built or data read before the flags were checked")

    monkeypatch.setattr(cli, "_from_model", never)
    monkeypatch.setattr(cli, "_from_checkpoint", never)
    out = tmp_path / "out"
    err = _one_line_error(capsys, ["--model", "mobilenet_v3_small", "--data", str(folder), "--out", str(out), *flags])
    assert expected in err
    assert not out.exists()


def test_files_that_are_no_torch_file_are_named_so(folder, tmp_path, capsys) -> None:
    out = ["--out", str(tmp_path / "out")]
    png = next((folder / "val" / "cat").glob("*.png"))
    as_json, empty = tmp_path / "config.json", tmp_path / "empty.pt"
    as_json.write_text('{"lr": 0.1}\n')
    empty.write_bytes(b"")
    for path, kind in [(png, "it holds a PNG image"), (as_json, "it holds JSON"), (empty, "the file is empty")]:
        err = _one_line_error(capsys, ["--ckpt", str(path), *out])
        assert f"{path} is not a torch checkpoint ({kind}" in err and "refusing to run" not in err
    err = _one_line_error(capsys, ["--model", "mobilenet_v3_small", "--weights", str(png), "--data", str(folder), *out])
    assert "is not a torch weights file (it holds a PNG image)" in err and "refusing to run" not in err


def test_data_of_other_classes_than_the_checkpoints_is_refused(ckpt, folder, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    err = _one_line_error(capsys, ["--ckpt", str(ckpt), "--data", str(folder), "--out", str(out)])
    assert f"--data {folder} holds the classes [cat, dog, fox]" in err
    assert "trained on [0, 1, 2, 3, 4, 5, ... (10 in all)]" in err and "digits" in err
    assert not (out / "summary.json").exists() and not (out / "excitations.csv").exists()


def test_a_class_asked_for_twice_is_refused(ckpt, folder, tmp_path, capsys) -> None:
    out = ["--out", str(tmp_path / "out")]
    err = _one_line_error(capsys, ["--ckpt", str(ckpt), "--classes", "1,1", *out])
    assert "class '1' is asked for twice (as '1' and '1'): list each class once" in err
    err = _one_line_error(capsys, ["--model", "mobilenet_v3_small", "--data", str(folder), "--classes", "dog,cat,0",
                                   *out])
    assert "class 'cat' is asked for twice (as 'cat' and '0')" in err
    from analysis.collected import resolve_classes
    from analysis.errors import AnalysisError

    assert resolve_classes(["b", 1], ["a", "b"]) == [1, 1]  # the library alone still resolves each mention
    with pytest.raises(AnalysisError, match="class 'b' is asked for twice"):
        resolve_classes(["b", 1], ["a", "b"], once=True)


def test_the_study_is_resolved_once_before_any_capture(ckpt, tmp_path, capsys, monkeypatch) -> None:
    """--protocol paper on the digits: the paper's SE blocks of SE-ResNet-18, every class captured and --classes
    drawn, --ablate last-stage; the run finds the gates once and every step (capture, figures, removal) reuses them."""
    import sys

    import analysis.capture

    flags = ["--ckpt", str(ckpt), "--protocol", "paper", "--per-class", "2", "--out", str(tmp_path), "--no-progress"]
    err = _one_line_error(capsys, [*flags, "--classes", "7,42"])
    assert "unknown class '42': use any of 0, 1, 2" in err
    args = build_parser().parse_args([*flags, "--classes", "7,3", "--ablate", "last-stage"])
    study = resolve_study(args)
    assert study.blocks == ["layer1.1.se", "layer2.1.se", "layer3.1.se", "layer4.0.se", "layer4.1.se"]
    assert [study.found.paper_names[b] for b in study.blocks] == ["SE_2_2", "SE_3_2", "SE_4_2", "SE_5_1", "SE_5_2"]
    assert study.ablated == ["layer4.0.se", "layer4.1.se"] and len(study.found.gates) == 8
    assert study.classes == list(range(10)) and study.drawn == [7, 3] and study.per_class == 2
    assert not (tmp_path / "excitations.csv").exists()

    original, calls = analysis.capture.find_gates, []

    def counted(model):
        calls.append(type(model).__name__)
        return original(model)

    for name, module in list(sys.modules.items()):
        if name.startswith("analysis") and getattr(module, "find_gates", None) is original:
            monkeypatch.setattr(module, "find_gates", counted)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run(args).summary
    assert calls == ["ResNet"]
    assert summary["run"]["drawn_classes"] == ["7", "3"] and len(summary["blocks"]) == 5
    assert summary["ablation"][1]["blocks"] == "SE_5_1,SE_5_2"


def test_ablating_blocks_left_out_of_the_study_is_refused_before_the_capture(ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    err = _one_line_error(capsys, ["--ckpt", str(ckpt), "--blocks", "SE_5_2", "--ablate", "SE_5_1", "--out", str(out)])
    assert "--ablate SE_5_1: not among the --blocks studied" in err
    assert not (out / "excitations.csv").exists()


def test_ablation_of_a_torchvision_se_network(folder, tmp_path) -> None:
    """MobileNetV3's own SE modules are taken out (an identity: the block computes x, not x * s) before the study's
    images are scored; the parameters saved are exactly those of its SqueezeExcitation modules."""
    from torchvision.ops import SqueezeExcitation

    out = tmp_path / "study"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--model", "mobilenet_v3_small", "--data", str(folder), "--crop", "32", "--resize", "32",
                     "--num-classes", "3", "--ablate", "all", "--out", str(out), "--no-progress"]) == 0
    rows = {r["variant"]: r for r in json.loads((out / "summary.json").read_text())["ablation"]}
    model = torchvision.models.mobilenet_v3_small(num_classes=3)
    se = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    se_params = sum(p.numel() for m in se for p in m.parameters())
    assert len(se) == 9 and rows["removed"]["blocks"].count(",") == 8
    assert rows["intact"]["params"] == sum(p.numel() for p in model.parameters())
    assert rows["removed"]["params"] == rows["fixed"]["params"] == rows["intact"]["params"] - se_params
    assert rows["removed"]["se_overhead_pct"] == 0 < rows["intact"]["se_overhead_pct"]
    assert all(r["images"] == 9 for r in rows.values())


def test_a_gate_the_removal_does_not_know_is_refused_by_name() -> None:
    from torch import nn

    from analysis.errors import AnalysisError
    from analysis.removal import ablation_blocks

    class OwnGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Sigmoid()

        def forward(self, x):
            return x * self.gate(x.mean((2, 3), keepdim=True))

    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model.se = OwnGate()
    with pytest.raises(AnalysisError, match=r"--ablate cannot take out se \(OwnGate\)"):
        ablation_blocks(model, "all")
