"""Any CNN (issue 12): a dozen representative architectures at small inputs, and what makes them work.

Each zoo model is checked like benchmarks/zoo.py does (SE blocks counted against the model's own block classes, the
SE model's output shape, remove_se giving the base outputs back exactly); then skip-not-fail, divisor= rounding,
optional forward arguments, concatenating branches, Res2Net's inner sums and silence on stdout/stderr.
"""

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn

from se_surgery import SurgeryError, add_se, remove_se, se_blocks
from se_surgery.surgery.planning import hidden_width

from .models import DataDependent, Hybrid, PlusBlock, conv_bn

timm = pytest.importorskip("timm")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These are many small ops: one thread is as fast, and does not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(model: nn.Module, kind: str, where=lambda m: True) -> int:
    """Independent reference: how many modules of the class named ``kind`` (and matching ``where``) the model has."""
    return sum(type(m).__name__ == kind and where(m) for m in model.modules())


def ghost_plain(m) -> bool:  # GhostNet's residual units without their own SE, identity shortcut, >= r channels
    return m.se is None and len(m.shortcut) == 0 and m.ghost2.out_chs >= 16


# name, builder, input size, expected SE blocks (from the model's own classes), what it shows
ZOO = [
    ("resnet18", lambda: torchvision.models.resnet18(), 32, lambda m: count(m, "BasicBlock")),
    ("mnasnet0_5", lambda: torchvision.models.mnasnet0_5(), 32,
     lambda m: count(m, "_InvertedResidual", lambda b: b.apply_residual)),
    ("dla34", lambda: timm.create_model("dla34"), 32, lambda m: count(m, "DlaBasic")),  # optional `shortcut` argument
    ("ghostnet_050", lambda: timm.create_model("ghostnet_050"), 32,
     lambda m: count(m, "GhostBottleneck", ghost_plain)),  # branches end in a concatenation
    ("resnet10t", lambda: timm.create_model("resnet10t"), 32, lambda m: count(m, "BasicBlock")),
    ("hrnet_w18_small", lambda: timm.create_model("hrnet_w18_small"), 32,
     lambda m: count(m, "BasicBlock") + count(m, "Bottleneck")),  # its fuse modules fx cannot trace are skipped
    ("repghostnet_050", lambda: timm.create_model("repghostnet_050"), 32, lambda m: 32),  # 4-channel blocks skipped
    ("efficientvit_b0", lambda: timm.create_model("efficientvit_b0"), 32, lambda m: 10),  # an 8-channel block skipped
    ("efficientvit_m0", lambda: timm.create_model("efficientvit_m0"), 32,
     lambda m: count(m, "ResidualDrop", lambda r: type(r.m).__name__ != "LocalWindowAttention")),
    ("tiny_vit_5m_224", lambda: timm.create_model("tiny_vit_5m_224"), 32,
     lambda m: count(m, "MBConv")),  # its attention blocks fx cannot trace are skipped; the MBConv stage is not
    ("twins_pcpvt_small", lambda: timm.create_model("twins_pcpvt_small", depths=(1, 1, 1, 1)), 32,
     lambda m: count(m, "PosConv")),  # PosConv(x, size): a size tuple traced element by element
    ("convnext_atto", lambda: timm.create_model("convnext_atto"), 32, lambda m: count(m, "ConvNeXtBlock")),
]


@pytest.mark.parametrize("name,builder,size,expected", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_model_gets_its_se_blocks_and_gives_them_back(name, builder, size, expected):
    torch.manual_seed(0)
    base = builder().eval()
    x = torch.randn(2, 3, size, size)
    se = add_se(base, example_input=x).eval()
    assert len(se_blocks(se)) == expected(base) > 0
    with torch.no_grad():
        out, ref = se(x), base(x)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert torch.equal(remove_se(se).eval()(x), ref)


def test_an_untraceable_block_is_skipped_with_a_warning_and_strict_refuses(caplog):
    model = Hybrid()
    snapshot = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.WARNING, logger="se_surgery"):
        se = add_se(model)
    assert list(se_blocks(se)) == ["block.se"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "`untraceable` (DataDependent)" in warning and "leaf_modules=['untraceable']" in warning
    with pytest.raises(SurgeryError, match="cannot trace.*untraceable"):
        add_se(model, strict=True, inplace=True)
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert type(model.untraceable) is DataDependent and type(model.block) is PlusBlock  # untouched
    with pytest.raises(SurgeryError, match="can take an SE.*cannot trace"):  # nothing else to gate: refused
        add_se(nn.Sequential(nn.Conv2d(3, 8, 1), DataDependent(8)))


def test_a_block_narrower_than_r_is_skipped_and_divisor_gates_it(caplog):
    base = torchvision.models.resnet18()
    with caplog.at_level(logging.WARNING, logger="se_surgery"):
        se = add_se(base, reduction=65)
    assert [n for n in se_blocks(se) if n.startswith("layer1")] == [] and len(se_blocks(se)) == 6
    assert "64 channels, fewer than r=65" in caplog.text and "divisor=8" in caplog.text and "layer1.0" in caplog.text
    with pytest.raises(SurgeryError, match="reduction=65 is larger than the 64 channels of layer1.0"):
        add_se(base, reduction=65, strict=True)
    rounded = se_blocks(add_se(base, reduction=65, divisor=8))
    assert len(rounded) == 8 and rounded["layer1.0.se"].fc1.out_channels == 8  # max(divisor, round(64 / 65))
    assert rounded["layer4.1.se"].fc1.out_channels == 8  # 512 / 65 = 7.9 -> 8
    with pytest.raises(SurgeryError, match="divisor"):
        add_se(base, divisor=0)


@pytest.mark.parametrize("channels", [4, 8, 24, 64, 100, 200, 2048])
@pytest.mark.parametrize("r", [4, 16, 32])
def test_divisor_rounds_the_hidden_width_as_timm_does(channels, r):
    from timm.layers import SEModule

    reference = SEModule(channels, rd_ratio=1 / r, rd_divisor=8).fc1.out_channels
    assert hidden_width(channels, r, 8) == reference
    assert hidden_width(channels, r) == channels // r  # no divisor: the paper's C // r


def test_ghost_branch_ending_in_a_concatenation_is_channels_first():
    class Ghost(nn.Module):  # the primary and the cheap features, concatenated to 16 channels
        def __init__(self) -> None:
            super().__init__()
            self.primary, self.cheap = conv_bn(16, 8, 1), conv_bn(8, 8)

        def forward(self, x):
            y = self.primary(x)
            return torch.cat([y, self.cheap(y)], 1)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ghost1, self.ghost2 = Ghost(), Ghost()

        def forward(self, x):
            y = self.ghost2(self.ghost1(x))
            y += x
            return y

    for width in (6, 8):  # 8: the cheap conv's width equals the tensor's last dimension
        x = torch.randn(2, 3, width, width)
        se = add_se(nn.Sequential(nn.Conv2d(3, 16, 1), Block()), reduction=4, example_input=x)
        assert list(se_blocks(se)) == ["1.se"]


def test_res2net_inner_split_sums_are_not_residual_units(caplog):
    base = timm.create_model("res2net50_14w_8s")  # 8 splits: 6 inner sums in each of 12 non-first blocks
    with caplog.at_level(logging.WARNING, logger="se_surgery"):
        se = add_se(base, example_input=torch.randn(2, 3, 32, 32))
    assert len(se_blocks(se)) == count(base, "Bottle2neck") == 16
    assert all(name.count(".") == 2 for name in se_blocks(se))  # layerK.i.se: one per block
    assert "72 sum(s) where its lighter operand is only a piece" in caplog.text


def test_dla_optional_shortcut_argument_and_no_stray_output(capfd):
    model = timm.create_model("dla34")
    capfd.readouterr()
    se = add_se(model, example_input=torch.randn(2, 3, 32, 32))
    hrnet = add_se(timm.create_model("hrnet_w18_small"), example_input=torch.randn(2, 3, 32, 32))  # fx fails inside
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # ShapeProp's traceback print is swallowed; the warning goes to logging only
    # tree2 blocks are called without a shortcut (None: traced as such), tree1 blocks get one (a forward argument)
    names = set(se_blocks(se))
    assert "level2.tree1.se" in names and "level2.tree2.se" in names
    assert len(se_blocks(hrnet)) > 0


def test_a_size_argument_is_traced_element_by_element_and_not_frozen():
    class Pos(nn.Module):  # Twins' PosConv: tokens in, the feature map's size as an argument
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(16, 16, 3, padding=1, groups=16)

        def forward(self, x, size):
            n, _, c = x.shape
            feat = x.transpose(1, 2).view(n, c, *size)
            return (self.proj(feat) + feat).flatten(2).transpose(1, 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.pos = nn.Conv2d(3, 16, 1), Pos()

        def forward(self, x):
            x = self.stem(x)
            return self.pos(x.flatten(2).transpose(1, 2), x.shape[2:])  # a torch.Size

    base = Net().eval()
    se = add_se(base, reduction=4)  # probed at 64 x 64
    assert list(se_blocks(se)) == ["pos.se"]
    x = torch.randn(2, 3, 24, 20)  # another size: the traced block must not have frozen 64 x 64
    with torch.no_grad():
        assert se.eval()(x).shape == (2, 480, 16)
        assert torch.equal(remove_se(se).eval()(x), base(x))


def _probe_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """Records the size of every image batch the backbone's first convolution sees (copies of the model too)."""
    seen: list[tuple[int, int]] = []
    model.backbone.body.conv1.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    return seen


def test_unresized_keeps_a_detection_models_input_at_its_size_and_restores_the_transform():
    from se_surgery.surgery.inputs import unresized

    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    seen, x = _probe_sizes(model), torch.randn(2, 3, 64, 96)
    with unresized(model, x), torch.no_grad():
        model(x)
    assert seen == [(64, 96)]  # not upscaled to a short side of 800 px
    with pytest.raises(RuntimeError, match="inside"), unresized(model, x):
        raise RuntimeError("inside")
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333


def test_add_se_probes_a_detection_model_at_the_probe_size_not_at_800_px():
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    seen = _probe_sizes(model)  # the hook travels into planning's working copy
    se = add_se(model)
    assert len(se_blocks(se)) == 16
    assert seen == [(64, 64)]  # one probe forward, at the default probe's 64 px: no 800 x 800 backbone pass
    assert (se.transform.min_size, se.transform.max_size) == (model.transform.min_size, model.transform.max_size)
