"""The SENet design space as add_se options (positions, squeeze, excitation, bias, se_layer), against hand-written
references with the same weights, and the exact costs of the paper's ablation tables."""

import copy
import logging
import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet

from se_surgery import SurgeryError, add_se, se_blocks, summary
from se_surgery.surgery.cost import count_macs
from se_surgery.surgery.se_module import SELayer

from .models import conv_bn

ACT = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}


def se_ref(se: SELayer, u: torch.Tensor, squeeze: str = "avg", excitation: str = "sigmoid") -> torch.Tensor:
    """SENet Eq. 2-4 written out: z = squeeze(u); s = sigma(W2 relu(W1 z + b1) + b2); u * s (per position for none)."""
    z = {"avg": lambda: u.mean((2, 3), keepdim=True), "max": lambda: u.amax((2, 3), keepdim=True),
         "none": lambda: u}[squeeze]()
    w1, w2 = se.fc1.weight[:, :, 0, 0], se.fc2.weight[:, :, 0, 0]
    b1 = se.fc1.bias if se.fc1.bias is not None else torch.zeros(w1.shape[0])
    b2 = se.fc2.bias if se.fc2.bias is not None else torch.zeros(w2.shape[0])
    h = torch.relu(torch.einsum("oc,nchw->nohw", w1, z) + b1[:, None, None])
    s = ACT[excitation](torch.einsum("oc,nchw->nohw", w2, h) + b2[:, None, None])
    return u * s


def randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine weights, so a misplaced SE cannot hide behind an identity BN."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def projection(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))


BLOCKS = {
    "basic": lambda: resnet.BasicBlock(16, 16),
    "basic-projection": lambda: resnet.BasicBlock(16, 32, 2, projection(16, 32)),
    "bottleneck": lambda: resnet.Bottleneck(64, 16),
    "bottleneck-projection": lambda: resnet.Bottleneck(16, 16, 2, projection(16, 64)),
}


def hand_written(block: nn.Module, se: SELayer, position: str, x: torch.Tensor) -> torch.Tensor:
    """The block's forward written out, with the SE where SENet Fig. 5 / Table 15 puts it."""
    pre = se_ref(se, x) if position == "pre" else x
    out = block.relu(block.bn1(block.conv1(pre)))
    if position == "3x3" and isinstance(block, resnet.BasicBlock):
        out = se_ref(se, out)
    if isinstance(block, resnet.Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        if position == "3x3":
            out = se_ref(se, out)
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    if position == "standard":
        out = se_ref(se, out)
    identity = block.downsample(x) if block.downsample is not None else x  # the skip takes the input unchanged
    if position == "identity":
        identity = se_ref(se, identity)
    out = block.relu(out + identity)
    return se_ref(se, out) if position == "post" else out


@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity", "3x3"])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_position_matches_a_hand_written_block(kind, position):
    torch.manual_seed(0)
    cin = BLOCKS[kind]().conv1.in_channels
    base = randomise_norms(nn.Sequential(nn.Conv2d(3, cin, 3, padding=1), BLOCKS[kind]()))
    model = add_se(base, reduction=4, position=position).eval()
    ((name, se),) = se_blocks(model).items()
    assert name == "1.se" and se._se_surgery["position"] == position
    block = model[1]
    assert type(block).__name__ == type(base[1]).__name__ and isinstance(block, type(base[1]))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h = model[0](x)
        torch.testing.assert_close(block(h), hand_written(block, se, position, h), rtol=1e-5, atol=1e-5)
    widths = {"pre": cin, "3x3": block.conv1.out_channels}
    last_norm = block.bn2 if kind.startswith("basic") else block.bn3
    assert se.fc1.in_channels == widths.get(position, last_norm.num_features)


@pytest.mark.parametrize("squeeze", ["avg", "max", "none"])
@pytest.mark.parametrize("excitation", ["sigmoid", "tanh", "relu"])
def test_squeeze_and_excitation_follow_their_formula(squeeze, excitation):
    torch.manual_seed(0)
    model = add_se(nn.Sequential(nn.Conv2d(3, 16, 1), resnet.BasicBlock(16, 16)), reduction=4, squeeze=squeeze,
                   excitation=excitation, bias=excitation != "tanh").eval()
    se = se_blocks(model)["1.se"]
    assert se._se_surgery | {"order": None} == {
        "paper_name": "SE_2_1", "order": None, "replaced_none": False, "position": "standard",
        "squeeze": squeeze, "excitation": excitation, "bias": excitation != "tanh", "se_layer": None,
        "fused": True}
    assert (se.fc1.bias is None) == (excitation == "tanh")
    u = torch.randn(2, 16, 5, 7)
    gates = []
    se.scale_activation.register_forward_hook(lambda m, i, o: gates.append(o))  # the gate s the analysis reads
    with torch.no_grad():
        torch.testing.assert_close(se(u), se_ref(se, u, squeeze, excitation), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(se(u), u * se.gate(u))
    assert gates[0].shape == ((2, 16, 5, 7) if squeeze == "none" else (2, 16, 1, 1))


def test_identity_init_opens_every_gate():
    u = torch.randn(2, 32, 4, 4)
    for excitation in ("sigmoid", "tanh", "relu"):
        net = nn.Sequential(nn.Conv2d(3, 32, 1), resnet.BasicBlock(32, 32))
        model = add_se(net, excitation=excitation, init="identity")
        se = se_blocks(model)["1.se"]
        with torch.no_grad():
            torch.testing.assert_close(se(u), u, rtol=1e-4, atol=1e-4)


def test_se_layer_puts_a_timm_module_anywhere():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    base = randomise_norms(torchvision.models.resnet18())
    for position in ("standard", "post"):
        model = add_se(base, position=position, se_layer=timm_layers.EcaModule).eval()
        blocks = se_blocks(model)
        assert len(blocks) == 8 and all(isinstance(b, timm_layers.EcaModule) for b in blocks.values())
        assert blocks["layer2.0.se"]._se_surgery["se_layer"] == "EcaModule"
        block, eca = model.layer2[0], blocks["layer2.0.se"]
        x = torch.randn(2, 64, 16, 16)
        with torch.no_grad():
            out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
            if position == "standard":
                ref = block.relu(eca(out) + block.downsample(x))
            else:
                ref = eca(block.relu(out + block.downsample(x)))
            torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
    assert {k for k in model.state_dict() if ".se." in k} == {f"{n}.conv.weight" for n in blocks}


@pytest.mark.parametrize(
    "options, match",
    [({"position": "middle"}, "position must be one of"), ({"squeeze": "mean"}, "squeeze must be one of"),
     ({"excitation": "softmax"}, "excitation must be one of"), ({"bias": "yes"}, "bias must be True or False"),
     ({"se_layer": 3}, "se_layer must be a callable"),
     ({"se_layer": lambda c: nn.Conv2d(c, 2 * c, 1)}, r"maps 2 x \d+ x 5 x 7 to \(2, \d+, 5, 7\).*same shape"),
     ({"se_layer": lambda c: "gate"}, "must return an nn.Module"),
     ({"init": "identity", "bias": False}, "needs bias=True")],
)
def test_bad_options_leave_the_model_untouched(options, match):
    model = torchvision.models.resnet18()
    snapshot, modules = copy.deepcopy(model.state_dict()), list(model.modules())
    with pytest.raises(SurgeryError, match=match):
        add_se(model, inplace=True, **options)
    assert list(model.modules()) == modules and all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    assert type(model.layer1[0]) is resnet.BasicBlock


def test_3x3_without_an_inner_spatial_conv(caplog):
    class Pointwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = conv_bn(8, 8, 1), conv_bn(8, 8, 1)

        def forward(self, x):
            return x + self.conv2(torch.relu(self.conv1(x)))

    for model in (nn.Sequential(nn.Conv2d(3, 8, 1), Pointwise()), torchvision.models.mobilenet_v2()):
        with pytest.raises(SurgeryError, match=r"position='3x3' fits none.*spatial convolution"):
            add_se(model, reduction=2, position="3x3")
    mixed = nn.Sequential(nn.Conv2d(3, 8, 1), Pointwise(), resnet.BasicBlock(8, 8))
    with caplog.at_level(logging.WARNING, logger="se_surgery"):
        assert list(se_blocks(add_se(mixed, reduction=2, position="3x3"))) == ["2.se"]
    assert "spatial convolution" in caplog.text and "(1)" in caplog.text


RESNET50_PARAMS = {  # SENet Table 10 (r), Table 13 (where), Table 15 (SE 3x3), and the paper's bias-free ablations
    (("reduction", 2),): 45_699_240, (("reduction", 4),): 35_635_688, (("reduction", 8),): 30_603_912,
    (("reduction", 16),): 28_088_024, (("reduction", 32),): 26_830_080,
    (("where", (2,)),): 25_582_424, (("where", (3,)),): 25_690_280, (("where", (4,)),): 26_349_992,
    (("position", "3x3"),): 25_718_228, (("bias", False),): 28_071_976, (("squeeze", "none"),): 28_088_024,
}


@pytest.mark.parametrize("options", list(RESNET50_PARAMS), ids=lambda o: "-".join(f"{k}={v}" for k, v in o))
def test_resnet50_costs_match_the_paper_tables_exactly(options):
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in options}
    model = add_se(torchvision.models.resnet50(), **kwargs)
    assert sum(p.numel() for p in model.parameters()) == RESNET50_PARAMS[options]


def se_macs(side: int | None) -> int:
    """Multiply-adds of ResNet-50's SE FC layers (C x C/16 twice per block): at every position of each stage's output
    for NoSqueeze (input side ``side``), once per image for the standard SE (``side=None``)."""
    stages = [(3, 256, 4), (4, 512, 8), (6, 1024, 16), (3, 2048, 32)]  # blocks, C, stride of the stage's output
    return sum(n * 2 * (side // stride if side else 1) ** 2 * c * (c // 16) for n, c, stride in stages)


def test_nosqueeze_multiply_adds_follow_the_formula():
    assert se_macs(224) == 411_041_792  # Table 16: 3.86 -> 4.27 GFLOPs, +0.41
    cost = summary(torchvision.models.resnet50(), (1, 3, 64, 64), squeeze="none")
    assert cost.params_se == 28_088_024 and cost.macs_se - cost.macs_base == se_macs(64)
    standard = count_macs(add_se(torchvision.models.resnet50()), (1, 3, 64, 64))
    assert standard - cost.macs_base == se_macs(None) == 2_514_944


def test_summary_takes_add_se_options_and_refuses_them_on_an_se_model():
    cost = summary(torchvision.models.resnet18(), (1, 3, 32, 32), reduction=8, where=[5], bias=False)
    assert cost.se_blocks == 2 and cost.params_se - cost.params_base == 2 * 2 * 512 * 64
    with pytest.raises(SurgeryError, match="plain model"):
        summary(add_se(torchvision.models.resnet18()), (1, 3, 32, 32), reduction=8)


@pytest.mark.parametrize("position", ["pre", "post", "identity"])
def test_an_se_off_the_branch_is_not_doubled(position):
    se = add_se(torchvision.models.resnet18(), position=position)
    with pytest.raises(SurgeryError, match="already holds an SE|add_se applied twice"):  # identity: SE on the skip
        add_se(se)


def test_summary_cli_takes_the_options_and_prints_the_paper_tables():
    import subprocess
    import sys

    def cli(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "se_surgery.describe", *args], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout

    out = cli("resnet18", "--position", "post", "--squeeze", "max", "--no-bias", "--where", "3,4", "-r", "8",
              "--input-size", "32")
    cost = summary(torchvision.models.resnet18(), (1, 3, 32, 32), reduction=8, where=[3, 4], position="post",
                   squeeze="max", bias=False)
    assert "r=8, where=[3, 4], position=post, squeeze=max, bias=False, 32x32 input" in out
    assert f"{cost.params_se:,}" in out and f"{cost.macs_se:,}" in out and "(4 SE blocks;" in out
    tables = cli("resnet50", "--paper-tables", "--input-size", "64")
    for label, params, paper in [("r=2", 45_699_240, "45.7M"), ("SE stage 4", 26_349_992, "26.4M"),
                                 ("SE 3x3", 25_718_228, "25.8M"), ("NoSqueeze", 28_088_024, "28.1M")]:
        assert re.search(rf"{re.escape(label)}\s+{params:,}\s+{paper}", tables), label
    assert "Table 10" in tables and "Table 13" in tables and "Table 15" in tables and "Table 16" in tables
    assert "\nTable 2: the networks" in tables and "\nTable 3: the mobile networks" in tables
    assert re.search(r"ResNet-50\s+resnet50\s+16\s+25\.6 -> 28\.1\s+25\.6 -> 28\.1\s+4\.089 -> 4\.092\s+"
                     r"4\.089 -> 4\.097\s+3\.86 -> 3\.87", tables)
    assert re.search(r"MobileNet\s+timm:mobilenetv1_100\s.*569 -> 572", tables)


# ---- the two multiply-add counts: conv + linear, and the paper's way (+ one pass of each SE's squeeze) -------------

def tiny_residual() -> nn.Sequential:
    """A 16-channel stem and two residual blocks: at 3 x 8 x 8, stem 8*8*16*3*9 = 27,648 multiply-adds, each block two
    3x3 convs of 8*8*16*16*9 = 147,456, the head 16*10 = 160: 617,632 in all (norms and pools are not counted)."""
    from .models import PlusBlock

    return nn.Sequential(conv_bn(3, 16), nn.ReLU(), PlusBlock(16), PlusBlock(16), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


def test_the_paper_way_adds_one_pooling_pass_per_se_to_the_fc_layers():
    from se_surgery.surgery.cost import count_costs, count_paper_macs

    base = tiny_residual()
    assert count_costs(base, (1, 3, 8, 8)) == (617_632, 617_632)  # no SE: both counts agree
    cost = summary(tiny_residual(), (1, 3, 8, 8), reduction=4)
    fc, pool = 2 * 16 * 4, 16 * 8 * 8  # per SE: W1 and W2 (C x C/r each), one add per element of u (C x H x W)
    assert (cost.se_blocks, cost.macs_base, cost.paper_macs_base) == (2, 617_632, 617_632)
    assert cost.macs_se == 617_632 + 2 * fc and cost.paper_macs_se == 617_632 + 2 * (fc + pool)
    assert count_paper_macs(add_se(tiny_residual(), reduction=4), (2, 3, 8, 8)) == 2 * cost.paper_macs_se  # batch 2
    # any se_layer add_se inserted counts its pooling pass too: timm's ECA (a k-tap conv over the channels)
    timm = pytest.importorskip("timm")
    eca = add_se(tiny_residual(), se_layer=timm.layers.EcaModule)
    taps = next(iter(se_blocks(eca).values())).conv.kernel_size[0]
    assert count_costs(eca, (1, 3, 8, 8)) == (617_632 + 2 * 16 * taps, 617_632 + 2 * (16 * taps + pool))
    # NoSqueeze pools nothing: its FC layers run at every position, and the two counts agree
    nosqueeze = summary(tiny_residual(), (1, 3, 8, 8), reduction=4, squeeze="none")
    assert nosqueeze.paper_macs_se == nosqueeze.macs_se == 617_632 + 2 * fc * 8 * 8


class SqueezeAnyDim(nn.Module):
    """An SE over N x C x any spatial dims (mean over all of them), as a 1-D or 3-D network would hold it."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden, bias=False), nn.Linear(hidden, c, bias=False)

    def forward(self, u):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(u.mean(tuple(range(2, u.dim())))))))
        return u * s.view(*s.shape, *[1] * (u.dim() - 2))


@pytest.mark.parametrize("dims, size", [(1, (50,)), (3, (4, 6, 6))], ids=["1-D", "3-D"])
def test_both_counts_take_1d_and_3d_models(dims, size):
    from se_surgery.surgery.cost import count_costs, squeeze_blocks

    conv, pool = {1: (nn.Conv1d, nn.AdaptiveAvgPool1d), 3: (nn.Conv3d, nn.AdaptiveAvgPool3d)}[dims]
    se = SqueezeAnyDim(8, 2)
    se._se_surgery = {"paper_name": "SE_1_1"}  # what add_se's metadata marks
    model = nn.Sequential(conv(2, 8, 3, padding=1, bias=False), se, pool(1), nn.Flatten(), nn.Linear(8, 10))
    spatial = torch.Size(size).numel()  # the product of every non-channel dim
    convs, fcs, head = spatial * 8 * 2 * 3**dims, 2 * 8 * 2, 8 * 10
    assert list(squeeze_blocks(model)) == ["1"]
    assert count_costs(model, (1, 2, *size)) == (convs + fcs + head, convs + fcs + head + 8 * spatial)
    assert count_macs(model, (3, 2, *size)) == 3 * (convs + fcs + head)


def test_a_networks_own_se_blocks_count_their_squeeze():
    from se_surgery.surgery.cost import count_costs, squeeze_blocks

    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), torchvision.ops.SqueezeExcitation(8, 2))
    assert list(squeeze_blocks(model)) == ["1"]
    macs, paper = count_costs(model, (1, 3, 5, 7))
    assert macs == 5 * 7 * 8 * 3 + 2 * 8 * 2 and paper == macs + 8 * 5 * 7


def test_big_numbers_stay_in_their_columns():
    """ResNet-152's multiply-adds ran into each other ("11,513,626,62411,520,204,800")."""
    from se_surgery.surgery.cost import Summary

    for scale in (1, 10**6):
        cost = Summary(50, 60_192_808 * scale, 66_821_848 * scale, 11_513_626_624 * scale, 11_520_204_800 * scale,
                       11_513_626_624 * scale, 11_533_350_912 * scale)
        for line, (base, se) in zip(str(cost).splitlines()[1:4], [(cost.params_base, cost.params_se),
                                                                   (cost.macs_base, cost.macs_se),
                                                                   (cost.paper_macs_base, cost.paper_macs_se)]):
            assert re.fullmatch(rf"[a-z' -]+ {base:,}  +{se:,}  +[+-]\d+\.\d\d%", line), line


def test_the_resnet50_row_of_table_2_stands_beside_the_papers():
    describe = __import__("importlib").import_module("se_surgery.describe")
    row = next(r for r in describe._NETWORK_ROWS if r.network == "ResNet-50")
    cost = describe.row_cost(row)
    pool = sum(n * c * (224 // stride) ** 2 for n, c, stride in [(3, 256, 4), (4, 512, 8), (6, 1024, 16),
                                                                  (3, 2048, 32)])
    assert (cost.se_blocks, cost.params_base, cost.params_se) == (16, 25_557_032, 28_088_024)
    assert cost.macs_se - cost.macs_base == se_macs(None) and cost.paper_macs_se - cost.macs_se == pool == 5_519_360
    table = describe.network_table([row], [cost])
    assert table.startswith("Table 2: ")
    assert re.search(r"ResNet-50\s+resnet50\s+16\s+25\.6 -> 28\.1\s+25\.6 -> 28\.1\s+4\.089 -> 4\.092\s+"
                     r"4\.089 -> 4\.097\s+3\.86 -> 3\.87", table), table
    assert "v1.5" in table


def test_a_refused_row_shows_dashes_and_says_why():
    from se_surgery.surgery.cost import NetworkCost

    describe = __import__("importlib").import_module("se_surgery.describe")
    row = next(r for r in describe._NETWORK_ROWS if r.network == "MobileNet")
    table = describe.network_table([row], [NetworkCost(None, 4_231_976, None, 568_740_352, None, 568_740_352, None,
                                                       "found no residual sum in EfficientNet")])
    assert table.startswith("Table 3: ")
    assert re.search(r"MobileNet\s+timm:mobilenetv1_100\s+-\s+4\.2 -> -\s+4\.2 -> 4\.7\s+568\.7 -> -\s+568\.7 -> -\s+"
                     r"569 -> 572", table), table
    assert "MobileNet: no SE columns: add_se refuses timm:mobilenetv1_100 (found no residual sum" in table
