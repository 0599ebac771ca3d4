"""Misuse of the surgery API and of ``python -m se_surgery.describe``: one line naming the problem and the fix, as a
SurgeryError (the API never exits), and the model given stays untouched."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.resnet import ResNet

from se_surgery import SurgeryError, add_se, paper_names, remove_se, se_blocks

from .helpers import one_line_error

summary_cli = importlib.import_module("se_surgery.describe")


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def snapshot(model: nn.Module) -> tuple:
    """What a failed call must leave as it was: the classes of every module and every tensor of the state_dict."""
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: tuple) -> None:
    classes, state = snapshot(model)
    assert classes == before[0]
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)


def refusal(call, *fragments: str) -> str:
    with pytest.raises(SurgeryError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


@pytest.mark.parametrize(
    ("model", "fragments"),
    [
        (None, ("got None", "add_se(torchvision.models.resnet18())")),
        (5, ("got int 5", "pass the model itself")),
        ("resnet18", ("got the string 'resnet18'", "add_se(torchvision.models.get_model('resnet18'))")),
        (ResNet, ("got the class ResNet: build it first", "add_se(torchvision.models.resnet18())")),
    ],
    ids=["none", "int", "name", "class"],
)
def test_add_se_needs_a_module_instance(model, fragments) -> None:
    refusal(lambda: add_se(model), "add_se needs an nn.Module instance", *fragments)


def test_a_script_module_is_refused_for_what_it_is() -> None:
    scripted = torch.jit.script(resnet18())
    message = refusal(lambda: add_se(scripted), "TorchScript", "call add_se on the eager model",
                      "torch.jit.script(add_se(model))")
    assert "example input" not in message
    refusal(lambda: remove_se(scripted), "TorchScript", "call remove_se on the eager model")


@pytest.mark.parametrize("inplace", [False, True])
def test_a_bad_example_input_is_named_and_the_model_kept(inplace) -> None:
    model = resnet18()
    before = snapshot(model)
    refusal(lambda: add_se(model, example_input="x", inplace=inplace),
            "example_input must be a torch.Tensor", "got str 'x'", "torch.randn(2, 3, 224, 224)")
    message = refusal(lambda: add_se(model, example_input=torch.randn(2, 1, 32, 32), inplace=inplace),
                      "failed on the example input of shape (2, 1, 32, 32)", "torch.randn(2, 3, 224, 224)")
    assert "randn(2, 1," not in message  # the fix names the channels the first convolution expects
    assert_untouched(model, before)
    assert not se_blocks(model)


def test_a_one_channel_model_is_told_its_own_channel_count() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU())
    refusal(lambda: add_se(model, example_input=torch.randn(2, 3, 16, 16)), "torch.randn(2, 1, 224, 224)")
    refusal(lambda: add_se(model, example_input=[1, 2]), "got list [1, 2]", "torch.randn(2, 1, 224, 224)")


@pytest.fixture(scope="module")
def se_model() -> nn.Module:
    return add_se(resnet18())


def test_remove_se_takes_one_name_alone(se_model) -> None:
    one = remove_se(se_model, "SE_5_1")
    assert set(paper_names(one).values()) == set(paper_names(se_model).values()) - {"SE_5_1"}
    assert list(se_blocks(one)) == list(se_blocks(remove_se(se_model, ["SE_5_1"])))
    assert "layer4.0.se" not in se_blocks(remove_se(se_model, "layer4.0.se"))


def test_remove_se_reads_an_int_as_a_paper_stage_like_add_se(se_model) -> None:
    x = torch.randn(2, 3, 32, 32)
    last = remove_se(se_model, 5).eval()
    assert sorted(paper_names(last).values()) == [f"SE_{s}_{b}" for s in (2, 3, 4) for b in (1, 2)]
    same = remove_se(se_model, ["SE_5_1", "SE_5_2"]).eval()
    with torch.no_grad():
        assert torch.equal(last(x), same(x))
    assert len(se_blocks(remove_se(se_model, [2, "SE_5_2"]))) == 5
    assert list(se_blocks(last)) == [b for b in se_blocks(se_model) if not b.startswith("layer4.")]


@pytest.mark.parametrize("inplace", [False, True])
def test_remove_se_refusals_leave_the_model_as_it_was(se_model, inplace) -> None:
    import copy

    model = copy.deepcopy(se_model)
    before = snapshot(model)
    refusal(lambda: remove_se(None), "remove_se needs an nn.Module instance, got None")
    refusal(lambda: remove_se(model, 9, inplace=inplace), "stage 9 holds no SE block", "[2, 3, 4, 5]")
    refusal(lambda: remove_se(model, 5.0, inplace=inplace), "cannot read names=5.0", "paper stages (5)")
    refusal(lambda: remove_se(model, [None], inplace=inplace), "cannot read the name None")
    refusal(lambda: remove_se(model, "SE_9_9", inplace=inplace), "['SE_9_9'] are not SE blocks", "layer4.1.se (SE_5_2)")
    refusal(lambda: remove_se(resnet18(), "SE_5_1"), "no SE block from add_se")
    assert_untouched(model, before)
    assert len(se_blocks(model)) == 8


def summary_error(capsys, *args: str) -> str:
    return one_line_error(lambda argv: summary_cli.main(argv[:-1]), capsys, list(args))  # no --no-progress here


@pytest.mark.parametrize("size", ["0", "-3"])
def test_summary_refuses_a_non_positive_input_size(capsys, size) -> None:
    err = summary_error(capsys, "resnet18", "--input-size", size)
    assert f"--input-size {size} must be a positive integer: pass e.g. --input-size 224" in err


@pytest.mark.parametrize("text, shape", [("224", (1, 3, 224, 224)), ("3,16,112,112", (1, 3, 16, 112, 112)),
                                         ("1,16000", (1, 1, 16000)), (" 3, 32,32", (1, 3, 32, 32))])
def test_summary_input_size_takes_an_image_side_or_any_channels_first_shape(text, shape) -> None:
    assert summary_cli._input_size(text) == shape


@pytest.mark.parametrize("size, message", [
    ("x", "--input-size 'x' is not a size: pass an image side (--input-size 224) or a channels-first shape"),
    ("2.5", "--input-size '2.5' is not a size"), ("3,", "--input-size '3,' is not a size"),
    ("3,0,4", "--input-size 3,0,4 must hold positive integers only: pass an image side (--input-size 224)"),
    ("1,-1", "--input-size 1,-1 must hold positive integers only"),
])
def test_summary_refuses_a_malformed_input_size_naming_the_forms(capsys, size, message) -> None:
    err = summary_error(capsys, "resnet18", "--input-size", size)
    assert message in err and "--input-size 3,16,112,112 for video, 1,16000 for audio" in err


def test_summary_says_which_input_sizes_exist_when_a_model_refuses_a_shape(capsys) -> None:
    err = summary_error(capsys, "resnet18", "--input-size", "1,16000")
    assert "resnet18 (ResNet) does not run on a 1x16000 input (" in err
    assert "pass the --input-size it takes, e.g. --input-size 224 (images), 1,16000 (audio) or 3,16,112,112" in err


def test_summary_refuses_a_non_positive_reduction(capsys) -> None:
    assert "--reduction 0 must be a positive integer" in summary_error(capsys, "resnet18", "-r", "0")


def tiny_vit() -> VisionTransformer:
    """A ViT as torchvision builds vit_b_16, at 32 px and two layers (vit_b_16 itself takes seconds per forward)."""
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)


def test_summary_tells_a_cli_user_what_a_transformer_lacks(capsys, monkeypatch) -> None:
    monkeypatch.setattr(summary_cli, "_base", lambda arch: tiny_vit)
    err = summary_error(capsys, "vit_b_16", "--input-size", "32")
    assert "vit_b_16 has no CNN unit an SE can go on" in err and "3-D tensors" in err
    assert "try resnet50" in err
    assert "=" not in err and "add_se" not in err  # no Python keyword for a command-line user
    err = summary_error(capsys, "vit_b_16", "--input-size", "64")
    assert "vit_b_16 (VisionTransformer) does not run on 64x64 images" in err and "--input-size 224" in err
    # the API keeps its Python advice
    refusal(lambda: add_se(tiny_vit(), example_input=torch.randn(2, 3, 32, 32)), "no residual sum of VisionTransformer",
            "regnet_x instead of regnet_y")


def test_summary_tells_a_cli_user_a_model_without_any_unit(capsys, monkeypatch) -> None:
    mlp = lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))  # noqa: E731
    monkeypatch.setattr(summary_cli, "_base", lambda arch: mlp)
    err = summary_error(capsys, "vgg11", "--input-size", "32")
    assert "vgg11 has no" in err and "found no unit in Sequential" in err
    assert "leaf_modules" not in err and "try resnet50" in err
