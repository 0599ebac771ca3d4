"""SE on plain and multi-branch networks (SENet Sec. 3.3): VGG and MobileNet chains, Inception modules, DenseNet and
ShuffleNetV2 concatenations; the ``units=`` rule; holders that keep Sequentials as they were."""

import logging
import re

import pytest
import timm
import torch
import torchvision
from torch import nn

from se_surgery import add_se, paper_names, plan, remove_se, se_blocks
from se_surgery.errors import SurgeryError
from se_surgery.surgery import SkipKind, UnitKind

from .models import PlusBlock, TappedBlock, TinyInception, TinyMobileNet, TinyVGG, separable, tiny_densenet

X = torch.randn(2, 3, 32, 32)


def _same_function(model: nn.Module, se: nn.Module, x: torch.Tensor = X) -> None:
    """The SE model keeps every base key and module class, and remove_se gives the base outputs back bit for bit."""
    model.eval(), se.eval()
    base = model.state_dict()
    new = set(se.state_dict()) - set(base)
    assert set(base) <= set(se.state_dict()) and all(re.search(r"(^|\.)se(_\d+)?\.", k) for k in new)
    assert [type(m).__name__ for m in model.modules()] == [
        type(m).__name__ for n, m in se.named_modules() if not re.search(r"(^|\.)se(_\d+)?(\.|$)", n)]
    with torch.no_grad():
        assert torch.equal(remove_se(se)(x), model(x))


def test_vgg_gets_an_se_after_each_conv_non_linearity_and_its_sequential_stays_as_it_was():
    model = TinyVGG()
    se = add_se(model, 4)
    assert list(se_blocks(se)) == ["features.2.se", "features.5.se", "features.7.se"]
    assert list(paper_names(se).values()) == ["SE_1_1", "SE_2_1", "SE_2_2"]  # a stage per resolution
    assert len(se.features) == len(model.features) == 9 and isinstance(se.features[2], nn.ReLU)
    prefix = se.features[:4]  # the perceptual-loss idiom: a slice still holds its SE
    assert isinstance(prefix, nn.Sequential) and len(prefix) == 4 and "2.se.fc1.weight" in prefix.state_dict()
    _same_function(model, se)
    with torch.no_grad():  # the SE changes the function: u * s with s in (0, 1)
        assert not torch.allclose(se.eval()(X), model.eval()(X))


def test_mobilenet_gets_one_se_per_depthwise_separable_unit_not_its_stem():
    model = TinyMobileNet()
    chosen = plan(model, 4, example_input=X)
    assert [u.se_name for u in chosen.units] == ["units.0.5.se", "units.1.5.se", "units.2.5.se"]
    assert {u.kind for u in chosen.units} == {UnitKind.PLAIN} and [u.channels for u in chosen.units] == [32, 64, 64]
    assert [(s.owner, s.kind) for s in chosen.skipped] == [("stem", SkipKind.OUTSIDE_UNITS)]
    _same_function(model, add_se(model, 4))


def test_inception_modules_get_one_se_on_their_output_and_inner_concatenations_none():
    model = TinyInception()
    chosen = plan(model, 4, example_input=X)
    assert [(u.se_name, u.kind, u.channels) for u in chosen.units] == [
        ("a.se", UnitKind.BRANCHES, 32), ("red.se", UnitKind.BRANCHES, 48), ("b.se", UnitKind.BRANCHES, 32)]
    assert sorted(s.owner for s in chosen.skipped if s.kind is SkipKind.INNER_CONCAT) == ["a", "b"]
    _same_function(model, add_se(model, 4))


def test_a_dense_block_gets_an_se_on_each_layers_new_features_which_every_later_layer_reads():
    model = tiny_densenet()
    se = add_se(model, 4)
    assert list(se_blocks(se)) == ["1.layer1.se", "1.layer2.se", "1.layer3.se"]
    assert len(se[1]) == 3 and list(se[1].keys()) == ["layer1", "layer2", "layer3"]  # the ModuleDict is unchanged
    seen = []
    se[1].layer3.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        se.eval()(X)
        layer1 = se[1].layer1.se
        u = remove_se(se)[1].layer1  # the layer before its SE
        features = [se[0](X)]
        assert torch.allclose(seen[0][1], layer1(u(features)), atol=1e-6)  # layer3 reads layer1's scaled features
    _same_function(model, se)


def test_torchvision_and_timm_plain_and_multi_branch_networks_get_the_papers_counts():
    counts = {}
    for name, build in [("vgg16_bn", lambda: torchvision.models.vgg16_bn()),
                        ("googlenet", lambda: torchvision.models.googlenet(init_weights=False)),
                        ("inception_v3", lambda: torchvision.models.inception_v3(init_weights=False)),
                        ("densenet121", lambda: torchvision.models.densenet121()),
                        ("shufflenet_v2_x0_5", lambda: torchvision.models.shufflenet_v2_x0_5()),
                        ("mobilenetv1_100", lambda: timm.create_model("mobilenetv1_100"))]:
        chosen = plan(build())
        counts[name] = (len(chosen), sorted({u.kind.value for u in chosen.units}))
    assert counts == {
        "vgg16_bn": (13, ["plain"]),  # SE-VGG-16: one per convolution (Table 2)
        "googlenet": (9, ["branches"]),  # one per Inception module
        "inception_v3": (11, ["branches"]),  # probed at 224 px: it fails at 64 and declares no size
        "densenet121": (58, ["dense"]),  # one per dense layer: 6 + 12 + 24 + 16
        "shufflenet_v2_x0_5": (16, ["branches", "dense"]),  # 3 down-sampling units + 13 split units
        "mobilenetv1_100": (13, ["plain"]),  # SE-MobileNet: one per depthwise separable unit (Table 3)
    }


def test_mobilenet_v1s_parameters_grow_as_table_3_says():
    model = timm.create_model("mobilenetv1_100")
    se = add_se(model)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, se))
    assert round(before / 1e6, 1) == 4.2 and round(after / 1e6, 1) == 4.7  # the paper's 4.2 M -> 4.7 M
    assert all(name.endswith("bn2.act.se") for name in se_blocks(se))  # timm's BatchNormAct2d is the non-linearity


def test_units_keyword_chooses_the_rule():
    resnet = torchvision.models.resnet18()
    assert len(plan(resnet)) == len(plan(resnet, units="residual")) == 8
    chain = plan(resnet, units="plain")  # every conv's ReLU: the stem's, and each block's first (its second
    assert len(chain) == 9 and {u.kind for u in chain.units} == {UnitKind.PLAIN}  # ReLU follows the sum)
    assert chain.units[0].se_name == "relu.se" and chain.units[1].se_name == "layer1.0.se"
    assert len(plan(TinyInception(), 4, units="plain", example_input=X)) == 12  # each BasicConv's ReLU
    with pytest.raises(SurgeryError, match="found no residual sum in TinyVGG.*units='auto'"):
        plan(TinyVGG(), units="residual")
    with pytest.raises(SurgeryError, match="no concatenation of parallel branches"):
        plan(TinyVGG(), units="concat")
    with pytest.raises(SurgeryError, match=r"units='everything' is no unit rule: pass one of 'auto', 'residual'"):
        plan(TinyVGG(), units="everything")


def test_the_design_space_where_it_means_something_and_a_clear_error_where_not(caplog):
    model = TinyVGG()
    assert list(se_blocks(add_se(model, 4, where=[2]))) == ["features.5.se", "features.7.se"]
    assert list(se_blocks(add_se(model, 4, where="SE_1_1"))) == ["features.2.se"]
    for options in ({"excitation": "tanh"}, {"squeeze": "max"}, {"bias": False}, {"init": "identity"},
                    {"se_layer": timm.layers.EcaModule}, {"divisor": 8}):
        se = add_se(model, 4, **options)
        assert len(se_blocks(se)) == 3 and se(X).shape == (2, 5), options
    with pytest.raises(SurgeryError, match="position='pre' places an SE around a residual sum.*leave position at"):
        add_se(model, position="pre")
    with caplog.at_level(logging.WARNING, logger="se_surgery"):
        narrow = plan(model, 32, example_input=X)  # the 16-channel unit is narrower than r
    assert len(narrow) == 2 and "fewer than r=32" in caplog.text
    with pytest.raises(SurgeryError, match="narrower|reduction=32 is larger than the 16 channels"):
        plan(model, 32, strict=True)


def test_a_second_add_se_finds_every_unit_holding_an_se():
    se = add_se(TinyVGG(), 4)
    with pytest.raises(SurgeryError, match="holds an SE from add_se"):
        add_se(se, 4)


def test_plain_and_dense_se_models_script_and_deepcopy():
    for model in (TinyVGG(), tiny_densenet(), TinyInception()):
        se = add_se(model, 4).eval()
        scripted = torch.jit.script(se)
        with torch.no_grad():
            assert torch.equal(scripted(X), se(X))
            assert torch.equal(torch.jit.script(remove_se(se))(X), model.eval()(X))


def test_dla_blocks_traced_with_none_arguments_still_script():
    model = timm.create_model("dla34").eval()
    se = add_se(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(se)(x), se(x), atol=1e-5)


def test_a_block_whose_class_computes_its_sum_in_another_method_is_left_without_se():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), TappedBlock(8), PlusBlock(8))
    chosen = plan(model, 4, example_input=X)
    assert [u.owner for u in chosen.units] == ["2"]
    (skip,) = [s for s in chosen.skipped if s.kind is SkipKind.OTHER_PATHS]
    assert skip.owner == "1" and "forward_with_tap" in skip.reason


def test_what_the_rules_must_not_take_for_a_unit():
    """A softmax head, a chain whose own SE follows its ReLU, a network with a few separable units among standard
    convolutions, a block whose forward delegates to a forward_* method."""
    softmax_head = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.Softmax(dim=1))
    assert [u.se_name for u in plan(softmax_head, 4, example_input=X).units] == ["1.se"]
    own_se = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), torchvision.ops.SqueezeExcitation(16, 4))
    with pytest.raises(SurgeryError, match="feeds an SE / attention gate already"):
        plan(own_se, 4, example_input=X)
    mixed = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.ReLU(), *[m for m in separable(16, 32)])
    assert len(plan(mixed, 4, example_input=X)) == 4  # three convolutions and one separable unit

    class Delegating(PlusBlock):
        def forward(self, x):
            return self.forward_impl(x)

        def forward_impl(self, x):
            return torch.relu(x + self.f(x))

    assert len(plan(nn.Sequential(nn.Conv2d(3, 8, 3), Delegating(8)), 4, example_input=X)) == 1


def test_a_dense_block_written_as_a_loop_of_concatenations_gets_one_se_per_layer():
    def layer(c: int) -> nn.Sequential:
        return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 8, 3, padding=1))

    class LoopDense(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.layers = nn.ModuleList(layer(c + 8 * i) for i in range(3))

        def forward(self, x):
            for f in self.layers:
                x = torch.cat([x, f(x)], 1)
            return x

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), LoopDense(16))
    chosen = plan(model, 2, example_input=X)
    assert [(u.se_name, u.kind, u.channels) for u in chosen.units] == [
        ("1.se", UnitKind.DENSE, 8), ("1.se_1", UnitKind.DENSE, 8), ("1.se_2", UnitKind.DENSE, 8)]
    _same_function(model, add_se(model, 2))


def test_a_network_inside_a_wrapper_gets_its_units_even_when_its_class_name_reads_like_a_gate():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torchvision.models.squeezenet1_1()  # "Squeeze" also names SE modules

        def forward(self, x):
            return self.backbone(x)

    assert len(plan(Wrapper(), example_input=torch.randn(1, 3, 64, 64))) == 8
