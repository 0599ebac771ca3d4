"""``--arch`` / ``--model package.module:factory``: a user's own network is built, trained, described and studied, each
failure is one line, and a checkpoint that names a factory never imports it on its own."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import textwrap

import pytest
import torch

from analysis.errors import AnalysisError
from analysis.excitations import main as excitations
from analysis.foreign import build_foreign_model
from se_surgery import describe, se_blocks
from se_surgery.archs import split_arch
from se_surgery.errors import CheckpointError, TrainError, UntrustedFactory
from se_surgery.train import get_recipe
from se_surgery.train.checkpoint import load_checkpoint, save_checkpoint
from se_surgery.train.models import accepted_kwargs, build_model, build_training_model

from .factories import SmallResNet, small_resnet
from .helpers import one_line_error

SMALL = "tests.factories:small_resnet"


def _config(arch: str, kwargs: dict | None = None, surgery: dict | None = None, num_classes: int = 3) -> dict:
    return {"arch": arch, "arch_kwargs": kwargs or {}, "num_classes": num_classes, "surgery": surgery,
            "input_size": 32}


def test_split_arch_names_a_factory_and_refuses_a_malformed_one() -> None:
    assert split_arch(SMALL) == ("factory", SMALL)
    assert split_arch("tests.factories:SmallResNet.build") == ("factory", "tests.factories:SmallResNet.build")
    assert split_arch("timm:resnet50") == ("timm", "resnet50") and split_arch("resnet50") == ("torchvision", "resnet50")
    for bad in ("models.py:net", "my-pkg.models:net", "pkg:", ":net", "pkg:net:more", "pkg..mod:net"):
        with pytest.raises(TrainError, match="is not a module:factory name: write it as package.module:function") as e:
            split_arch(bad)
        assert "\n" not in str(e.value) and "PYTHONPATH" in str(e.value)


def test_a_factory_builds_with_num_classes_and_arch_kwargs() -> None:
    model = build_model(_config(SMALL, {"width": 8}, num_classes=3), factory=SMALL)
    assert isinstance(model, SmallResNet) and model.fc.out_features == 3 and model.stem[0].out_channels == 8
    surgery = {"reduction": 4, "init": "he", "owners": None}
    se = build_model(_config("tests.factories:SmallResNet.build", {"width": 8}, surgery), trust=True)
    assert list(se_blocks(se)) == ["layer1.se", "layer2.se", "layer3.se"]
    assert se(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert accepted_kwargs(SMALL, {"width": 8, "zero_init_residual": True}) == {"width": 8}


def test_a_factory_is_what_the_trainer_builds_and_saves() -> None:
    recipe = get_recipe(arch=SMALL, arch_kwargs={"width": 8}, reduction=4).resolved()
    model, config = build_training_model(recipe, ["a", "b"])
    assert isinstance(model, SmallResNet) and config["arch"] == SMALL and config["arch_kwargs"] == {"width": 8}
    assert config["surgery"]["owners"] == ["layer1", "layer2", "layer3"] and model.fc.out_features == 2


@pytest.fixture
def broken_module(tmp_path, monkeypatch) -> str:
    """A module of the user's whose own import fails: a dependency that is not installed."""
    (tmp_path / "needs_a_missing_package.py").write_text("import surely_not_installed_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "needs_a_missing_package:build"


@pytest.mark.parametrize("arch, kwargs, pretrained, expected", [
    ("no_such_module_xyz:build", {}, False,
     "cannot import no_such_module_xyz for the factory no_such_module_xyz:build (ModuleNotFoundError: No module named "
     "'no_such_module_xyz'): put its folder on PYTHONPATH or pip install its package"),
    ("broken", {}, False, "No module named 'surely_not_installed_xyz'): put its folder on PYTHONPATH"),
    ("tests.factories:missing", {}, False,
     "tests.factories has no attribute 'missing' (it defines Block, SmallResNet, small_resnet, no_num_classes, "
     "needs_depth, returns_a_tuple): name a function or class that builds the model, tests.factories:NAME"),
    ("tests.factories:SmallResNet.nope", {}, False, "tests.factories:SmallResNet has no attribute 'nope'"),
    ("tests.factories:not_callable", {}, False,
     "tests.factories:not_callable is not callable (an object of type int): name a function or class that returns an "
     "nn.Module"),
    ("tests.factories:no_num_classes", {}, False,
     "the factory tests.factories:no_num_classes does not take num_classes (got an unexpected keyword argument "
     "'num_classes'): give it a num_classes keyword argument"),
    ("tests.factories:needs_depth", {}, False,
     "the factory tests.factories:needs_depth cannot be called with num_classes alone (missing a required argument: "
     "'depth'): give its other parameters defaults, or pass them with --arch-kwargs"),
    ("tests.factories:returns_a_tuple", {}, False,
     "the factory tests.factories:returns_a_tuple returned a tuple, not an nn.Module: make it return the model itself"),
    (SMALL, {"depth": 3}, False,
     "--arch-kwargs {\"depth\": 3} do not fit tests.factories:small_resnet (tests.factories:small_resnet() got an "
     "unexpected keyword argument 'depth'): pass only keyword arguments its builder takes"),
    (SMALL, {}, True,
     "--pretrained does not apply to the factory tests.factories:small_resnet, which builds its own weights: drop "
     "--pretrained and pass --weights FILE"),
])
def test_each_factory_failure_is_one_line_with_its_fix(arch, kwargs, pretrained, expected, broken_module) -> None:
    arch = broken_module if arch == "broken" else arch
    with pytest.raises(TrainError) as err:
        build_model(_config(arch, kwargs), pretrained=pretrained, factory=arch)
    assert expected in str(err.value) and "\n" not in str(err.value)


_MARKED = """
import pathlib

pathlib.Path(__file__).with_name("imported").write_text("the module's code ran")

from tests.factories import small_resnet as build
"""


@pytest.fixture
def stranger(tmp_path, monkeypatch) -> tuple:
    """A checkpoint whose model a factory builds, in a module that leaves a marker file when it is imported."""
    name = f"strangers_code_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(_MARKED))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    arch = f"{name}:build"
    torch.manual_seed(0)
    model = small_resnet(3).eval()  # the same network, built without importing the stranger's module
    path = tmp_path / "best.pt"
    config = {**_config(arch), "class_names": ["a", "b", "c"], "data": "digits", "resize": 32,
              "mean": [0.5, 0.5, 0.5]}
    save_checkpoint(path, {"model": model.state_dict(), "model_config": config, "epoch": 1})
    return path, arch, tmp_path / "imported", model, name


def test_a_checkpoint_never_imports_the_factory_it_names(stranger, capsys) -> None:
    path, arch, marker, original, module = stranger
    for call in (lambda: load_checkpoint(path), lambda: load_checkpoint(path, factory="other.models:net"),
                 lambda: build_model(json.loads(json.dumps(torch.load(path)["model_config"])))):
        with pytest.raises(UntrustedFactory) as err:
            call()
        assert isinstance(err.value, CheckpointError) and err.value.factory == arch and "\n" not in str(err.value)
        assert not marker.exists() and module not in sys.modules
    with pytest.raises(UntrustedFactory) as err:
        load_checkpoint(path)
    assert str(err.value) == (
        f"{path} builds its model with the factory {arch}, which se-surgery does not import on its own: pass --arch "
        f"{arch} (load_checkpoint(path, factory='{arch}')) if you trust it")
    with pytest.raises(UntrustedFactory, match=r"\(not other.models:net\)"):
        load_checkpoint(path, factory="other.models:net")
    err = one_line_error(excitations, capsys, ["--ckpt", str(path), "--out", str(path.parent / "study")])
    assert f"builds its model with the factory {arch}, which se-surgery does not import on its own: pass --model " \
           f"{arch} (or --trust-factory) if you trust it" in err
    assert not marker.exists() and module not in sys.modules
    # the control: named again, the factory is imported (the marker appears) and rebuilds the same model
    model, info = load_checkpoint(path, factory=arch)
    assert marker.exists() and info["epoch"] == 1
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), original(x))
    assert torch.equal(load_checkpoint(path, trust=True)[0](x), original(x))


def test_a_factory_checkpoint_is_studied_when_its_factory_is_named(stranger, capsys) -> None:
    path, arch, marker, _, _ = stranger
    path_se = path.with_name("se.pt")
    config = {**torch.load(path)["model_config"], "num_classes": 10, "class_names": [str(k) for k in range(10)],
              "surgery": {"reduction": 4, "init": "he", "owners": None}}
    model = build_model(config, trust=True)
    save_checkpoint(path_se, {"model": model.state_dict(), "model_config": config, "epoch": 1})
    common = ["--ckpt", str(path_se), "--per-class", "2", "--no-progress"]
    for flags in (["--model", arch], ["--trust-factory"]):
        out = path.parent / f"study{len(flags)}"
        with contextlib.redirect_stdout(io.StringIO()):
            assert excitations([*common, *flags, "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["run"]["arch"] == arch and len(summary["blocks"]) == 3
    err = one_line_error(excitations, capsys, ["--ckpt", str(path_se), "--model", "resnet18", "--out", str(out)])
    assert "--ckpt and --model resnet18 are two models: pass one of them" in err
    err = one_line_error(excitations, capsys, ["--model", "resnet18", "--trust-factory", "--data", "x", "--out",
                                               str(out)])
    assert "--trust-factory only applies to --ckpt" in err


def test_analysis_and_describe_take_a_factory_the_user_names(capsys) -> None:
    model = build_foreign_model(SMALL, num_classes=3)
    assert isinstance(model, SmallResNet) and not model.training and model.fc.out_features == 3
    with pytest.raises(AnalysisError, match="--model no_such_module_xyz:net: cannot import no_such_module_xyz"):
        build_foreign_model("no_such_module_xyz:net")
    assert describe.main([SMALL, "--input-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "SmallResNet: 3 SE block(s)" in printed and "layer3.se" in printed
    assert describe.main(["tests.factories:nope"]) == 2
    assert "tests.factories has no attribute 'nope'" in capsys.readouterr().err


def test_the_trainer_trains_a_factory_and_resumes_it_only_when_named_again(tmp_path, capsys) -> None:
    from se_surgery.train.checkpoint import read_checkpoint
    from se_surgery.train.cli import main as train_main

    out = tmp_path / "mine"
    flags = ["--epochs", "1", "--num-samples", "64", "--batch-size", "16", "--val-samples", "32", "--no-progress",
             "--out", str(out)]
    assert train_main(["--arch", SMALL, "--arch-kwargs", '{"width": 8}', "--reduction", "4", *flags]) == 0
    info = read_checkpoint(out / "last.pt")
    assert info["model_config"]["arch"] == SMALL and info["epoch"] == 1
    assert sum(k.endswith("se.fc1.weight") for k in info["model"]) == 3
    capsys.readouterr()
    err = one_line_error(train_main, capsys, [*flags, "--resume", "auto", "--epochs", "2"])
    assert f"was trained with --arch {SMALL}, code that a checkpoint does not import on its own: pass --arch " \
           f"{SMALL} (or --trust-factory) if you trust it" in err
    assert read_checkpoint(out / "last.pt")["epoch"] == 1  # nothing ran
    assert train_main([*flags, "--resume", "auto", "--epochs", "2", "--arch", SMALL]) == 0
    assert read_checkpoint(out / "last.pt")["epoch"] == 2
