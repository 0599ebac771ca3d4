"""plan then apply: se_surgery.plan shows what add_se does without touching the model; SEConfig; the layer registry."""

import logging
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from se_surgery import SEConfig, SurgeryError, add_se, apply_plan, paper_names, plan, se_blocks
from se_surgery.surgery import SkipKind, UnitKind
from se_surgery.surgery.layer_types import _REGISTRY, LayerKind, is_layer, layer_types, register_layer_type


def test_resnet50_plans_its_16_units_and_prints_them():
    p = plan(torchvision.models.resnet50())
    assert len(p) == 16 and p.owners[0] == "layer1.0" and p.owners[-1] == "layer4.2"
    assert [u.paper_name for u in p.units][-3:] == ["SE_5_1", "SE_5_2", "SE_5_3"]
    assert {u.kind for u in p.units} == {UnitKind.RESIDUAL} and all(u.fused for u in p.units)
    assert [(u.channels, u.hidden) for u in p.units][::5] == [(256, 16), (512, 32), (1024, 64), (2048, 128)]
    text = str(p).splitlines()
    assert text[0] == "ResNet: 16 SE block(s); standard SE, r = 16 (hidden C // r), he init"
    assert text[1].split() == ["SE", "block", "paper", "unit", "C", "hidden", "fused"]
    assert text[-1].split() == ["layer4.2.se", "SE_5_3", "residual", "2048", "128", "yes"] and len(text) == 18


def test_planning_leaves_the_model_as_it_was_and_apply_gives_add_se(resnet18_10):
    model = resnet18_10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    p = plan(model, where=[4, 5], reduction=8)
    assert [type(m) for m in model.modules()] == classes and not se_blocks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [s.kind for s in p.skipped] == [SkipKind.NOT_SELECTED] * 4 and p.skipped[0].owner == "layer1.0"
    applied = apply_plan(p)
    assert applied is not model
    assert list(se_blocks(applied)) == ["layer3.0.se", "layer3.1.se", "layer4.0.se", "layer4.1.se"]
    torch.manual_seed(1)
    direct = add_se(model, 8, where=[4, 5])
    assert paper_names(applied) == paper_names(direct) and applied.state_dict().keys() == direct.state_dict().keys()
    with pytest.raises(SurgeryError, match="applied already"):
        apply_plan(p)


def test_apply_in_place_changes_the_planned_model_itself():
    model = torchvision.models.resnet18()
    assert apply_plan(plan(model), inplace=True) is model and len(se_blocks(model)) == 8


def test_skips_carry_kinds_the_table_prints():
    partly = add_se(torchvision.models.resnet18(), where=[2], position="post")  # layer1 holds SE-POST blocks
    p = plan(partly)
    assert len(p) == 6 and [(s.owner, s.kind) for s in p.skipped] == [("layer1.0", SkipKind.HOLDS_SE),
                                                                       ("layer1.1", SkipKind.HOLDS_SE)]
    assert "layer1.0  add  holds SE  its block already holds an SE from add_se" in str(p)
    with pytest.raises(SurgeryError, match="already holds an SE"):
        plan(add_se(torchvision.models.resnet18()))


def test_a_config_travels_instead_of_keywords():
    config = SEConfig(reduction=8, squeeze="max", bias=False)
    by_config = add_se(torchvision.models.resnet18(), config=config)
    by_keywords = add_se(torchvision.models.resnet18(), 8, squeeze="max", bias=False)
    block = se_blocks(by_config)["layer4.1.se"]
    assert block.fc1.out_channels == 64 and block.fc1.bias is None and isinstance(block.avgpool, nn.AdaptiveMaxPool2d)
    assert by_config.state_dict().keys() == by_keywords.state_dict().keys()
    assert plan(torchvision.models.resnet18(), 4, config=config).config == config.replace(reduction=4)
    with pytest.raises(SurgeryError, match=r"unknown option\(s\) \['positon'\]"):
        plan(torchvision.models.resnet18(), positon="pre")


def test_seconfig_is_frozen_validated_and_plain_data():
    config = SEConfig(position="pre", init="identity")
    with pytest.raises(Exception):
        config.reduction = 4  # frozen
    assert config.to_dict(changed_only=True) == {"position": "pre", "init": "identity"}
    assert SEConfig.from_dict(config.to_dict()) == config
    assert SEConfig.choices()["position"] == ("standard", "pre", "post", "identity", "3x3")
    with pytest.raises(SurgeryError, match="squeeze must be one of 'avg', 'max', 'none'; got 'mean'"):
        SEConfig(squeeze="mean")
    with pytest.raises(SurgeryError, match="no option"):
        SEConfig.from_dict({"reductoin": 4})
    with pytest.raises(SurgeryError, match="needs bias=True"):
        SEConfig(init="identity", bias=False)


class Gate(nn.Module):  # a spatial attention map from a convolution, no global pool: only the registry can know it
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x))


class GatedBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn, self.recal = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), Gate(c)

    def forward(self, x):
        return x + self.recal(self.bn(self.conv(x)))


def test_a_registered_gate_marks_a_branch_as_gated():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), GatedBlock(), GatedBlock())
    assert len(plan(net, reduction=4)) == 2 and not is_layer(Gate(8), LayerKind.GATE)
    entry = register_layer_type("gate", Gate, "our channel attention")
    try:
        assert layer_types(LayerKind.GATE)[0] is entry and is_layer(Gate(8), LayerKind.GATE)
        with pytest.raises(SurgeryError, match="already gated|can take an SE"):
            plan(net, reduction=4)
    finally:
        _REGISTRY.remove(entry)
    with pytest.raises(SurgeryError, match="unknown layer kind 'gait'"):
        register_layer_type("gait", Gate, "typo")
    with pytest.raises(SurgeryError, match="needs a reason"):
        register_layer_type("gate", Gate, "")
    with pytest.raises(SurgeryError, match="not a regular expression"):
        register_layer_type("gate", "(unclosed", "a typo")
    assert all(e.reason for e in layer_types())


def test_the_warning_names_what_is_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger="se_surgery"):
        p = plan(torchvision.models.resnet18(), reduction=65)
    assert len(p) == 6 and [s.kind for s in p.skipped] == [SkipKind.NARROW] * 2
    assert "64 channels, fewer than r=65" in caplog.text


def test_describe_prints_the_plan_and_the_old_summary_command_still_runs():
    run = subprocess.run([sys.executable, "-m", "se_surgery.describe", "resnet18", "--input-size", "64"],
                         capture_output=True, text=True, check=True)
    assert "ResNet: 8 SE block(s)" in run.stdout and "layer4.1.se  SE_5_2" in run.stdout
    assert "parameters" in run.stdout
    old = subprocess.run([sys.executable, "-m", "se_surgery.summary", "resnet18", "--input-size", "64"],
                         capture_output=True, text=True, check=True)
    assert old.stdout == run.stdout and "deprecated; use python -m se_surgery.describe" in old.stderr


def test_importing_the_old_module_does_not_hide_the_function():
    import se_surgery.summary  # noqa: F401

    assert callable(se_surgery.summary) and se_surgery.summary.__module__ == "se_surgery.surgery.cost"


class LazyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.LazyConv2d(8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return x + self.bn(self.conv(x))


def test_planning_runs_on_a_copy_so_even_lazy_modules_stay_as_they_were():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), LazyBlock())
    se = add_se(model, reduction=4)
    assert type(model[1].conv) is nn.LazyConv2d and not se_blocks(model)  # the probe ran on the copy
    assert type(se[1].conv) is nn.Conv2d and list(se_blocks(se)) == ["1.se"]


def test_a_plan_applied_in_place_refuses_a_model_changed_since():
    model = torchvision.models.resnet18()
    first, second = plan(model), plan(model, reduction=4)
    apply_plan(first, inplace=True)
    with pytest.raises(SurgeryError, match="has changed since .* plan it again"):
        apply_plan(second, inplace=True)
    assert se_blocks(model)["layer4.0.se"].fc1.out_channels == 32  # the first plan's SE, not overwritten
    snapshot = apply_plan(second)  # not in place: the copy planned on, as the model was then
    assert se_blocks(snapshot)["layer4.0.se"].fc1.out_channels == 128


def test_the_planning_module_is_not_hidden_by_the_function():
    import importlib

    module = importlib.import_module("se_surgery.surgery.planning")
    assert module.plan is plan and callable(module.hidden_width)
