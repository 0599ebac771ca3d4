"""SE on 1-D and 3-D residual networks: torchvision's video ResNets and hand-written N x C x L and N x C x D x H x W
ResNets get one SE per block, squeezed over every dimension after C, named, fused and varied as in 2-D; token sums
stay refused; the default probe follows the model's dimensionality; the analysis runs on these models."""

import matplotlib
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

from analysis import ablate, capture_excitations, metrics_frame, plot_fig6
from analysis.capture import find_gates
from se_surgery import SurgeryError, add_se, paper_names, remove_se, se_blocks
from se_surgery.surgery.inputs import default_examples
from se_surgery.surgery.positions import POSITIONS
from se_surgery.surgery.probe import probe_first
from se_surgery.surgery.residual import Residual, Skipped
from se_surgery.surgery.se_module import SELayer, check_shape_kept
from se_surgery.surgery.skips import SkipKind

from .helpers import LabelledImages
from .models import ResNetNd, TokenBlock, Tokens1d
from .test_residual import verdicts

matplotlib.use("Agg")

VIDEO = {name: getattr(torchvision.models.video, name) for name in ("r3d_18", "mc3_18", "r2plus1d_18")}
VIDEO_SE = [f"layer{s}.{b}.se" for s in range(1, 5) for b in range(2)]
VIDEO_WIDTHS = [64, 64, 128, 128, 256, 256, 512, 512]
TOY_SE = ["layer1.0.se", "layer1.1.se", "layer2.0.se", "layer2.1.se"]
TOY_NAMES = dict(zip(TOY_SE, ["SE_2_1", "SE_2_2", "SE_3_1", "SE_3_2"]))
TOY_INPUT = {1: (2, 2, 64), 3: (2, 2, 4, 8, 8)}
ACT = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}


def randomise(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine weights in any dimension, in eval mode."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def se_ref(se: SELayer, u: torch.Tensor, squeeze: str = "avg", excitation: str = "sigmoid") -> torch.Tensor:
    """SENet Eq. 2-4 over a channels-first u of any rank: positions flattened, z pooled over all of them."""
    flat = u.flatten(2)
    z = {"avg": lambda: flat.mean(2, keepdim=True), "max": lambda: flat.amax(2, keepdim=True),
         "none": lambda: flat}[squeeze]()
    w1, w2 = se.fc1.weight[:, :, 0, 0], se.fc2.weight[:, :, 0, 0]
    b1 = se.fc1.bias if se.fc1.bias is not None else torch.zeros(w1.shape[0])
    b2 = se.fc2.bias if se.fc2.bias is not None else torch.zeros(w2.shape[0])
    h = torch.relu(torch.einsum("oc,ncl->nol", w1, z) + b1[:, None])
    s = ACT[excitation](torch.einsum("oc,ncl->nol", w2, h) + b2[:, None])
    return (flat * s).view_as(u)


def gate_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape of every SE block's gate s in one forward."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(block):
        def record(module, args, out):
            shapes.setdefault(block, tuple(out.shape))

        return record

    gates = find_gates(model)
    handles = [model.get_submodule(gate).register_forward_hook(hook(block)) for block, gate in gates.items()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def assert_removed_exactly(se_model: nn.Module, base: nn.Module, x: torch.Tensor) -> None:
    back = remove_se(se_model)
    assert not se_blocks(back) and back.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in back.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(x), base(x))


# ---- torchvision's video ResNets (N x C x D x H x W) ---------------------------------------------------------


@pytest.mark.parametrize("name", list(VIDEO))
def test_video_resnets_get_eight_se_with_their_stage_widths(name):
    torch.manual_seed(0)
    base = randomise(VIDEO[name]())
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        ref = base(x)
    model = add_se(base, example_input=x).eval()
    blocks = se_blocks(model)
    assert list(blocks) == VIDEO_SE
    assert [b.fc1.weight.shape for b in blocks.values()] == [(c // 16, c, 1, 1) for c in VIDEO_WIDTHS]
    assert list(paper_names(model).values()) == [f"SE_{s}_{b}" for s in range(2, 6) for b in (1, 2)]
    assert list(gate_shapes(model, x).values()) == [(1, c, 1, 1, 1) for c in VIDEO_WIDTHS]
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape and not torch.allclose(out, ref)  # the SE blocks act
    base_keys = set(base.state_dict())
    assert base_keys < set(model.state_dict()) and all(".se." in k for k in set(model.state_dict()) - base_keys)
    assert_removed_exactly(model, base, x)


def test_r3d_18_needs_no_example_input():
    base = torchvision.models.video.r3d_18()
    assert [tuple(x.shape) for x in default_examples(base)] == [(2, 3, 16, 32, 32), (2, 3, 16, 112, 112)]
    model = add_se(base)
    assert list(se_blocks(model)) == VIDEO_SE


# ---- hand-written 1-D and 3-D ResNets ------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 3])
def test_hand_written_resnet_gets_one_se_per_block_fused_as_unfused(dims):
    torch.manual_seed(0)
    base = randomise(ResNetNd(dims))
    x = torch.randn(TOY_INPUT[dims])
    fused = add_se(base, example_input=x, reduction=4).eval()
    unfused = add_se(base, example_input=x, reduction=4, fuse=False).eval()
    unfused.load_state_dict(fused.state_dict())
    assert paper_names(fused) == TOY_NAMES and list(se_blocks(unfused)) == TOY_SE
    assert [b.fc1.in_channels for b in se_blocks(fused).values()] == [16, 16, 32, 32]
    assert [b._se_surgery["fused"] for b in se_blocks(fused).values()] == [True] * 4
    assert [b._se_surgery["fused"] for b in se_blocks(unfused).values()] == [False] * 4
    assert set(gate_shapes(fused, x).values()) <= {(2, c) + (1,) * dims for c in (16, 32)}
    with torch.no_grad():  # the fused sum writes into the branch tensor here
        torch.testing.assert_close(fused(x), unfused(x), rtol=1e-5, atol=1e-6)
        block, h = fused.layer1[0], fused.stem(x)
        out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h)))))
        torch.testing.assert_close(block(h), torch.relu(h + se_ref(block.se, out)), rtol=1e-5, atol=1e-6)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for model, xi in zip((fused, unfused), xs):
        model(xi).square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
    assert_removed_exactly(fused, base, x)


VARIANTS = [{"squeeze": "max"}, {"squeeze": "none"}, {"excitation": "tanh"}, {"excitation": "relu", "bias": False},
            {"init": "identity"}]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dims", [1, 3])
def test_variants_run_in_1d_and_3d(dims, options):
    torch.manual_seed(0)
    base = randomise(ResNetNd(dims))
    x = torch.randn(TOY_INPUT[dims])
    model = add_se(base, example_input=x, reduction=4, **options).eval()
    assert list(se_blocks(model)) == TOY_SE
    u = torch.randn(2, 16, *TOY_INPUT[dims][2:])
    se = se_blocks(model)["layer1.0.se"]
    with torch.no_grad():
        torch.testing.assert_close(se(u), se_ref(se, u, options.get("squeeze", "avg"),
                                              options.get("excitation", "sigmoid")), rtol=1e-5, atol=1e-6)
        out, ref = model(x), base(x)
    assert out.shape == ref.shape
    if options.get("init") == "identity":  # gates open: the base network's outputs are kept
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-3)
    gate = gate_shapes(model, x)["layer1.0.se"]
    assert gate == ((2, 16, *TOY_INPUT[dims][2:]) if options.get("squeeze") == "none" else (2, 16) + (1,) * dims)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("dims", [1, 3])
def test_every_position_places_one_se_per_block(dims, position):
    torch.manual_seed(0)
    base = randomise(ResNetNd(dims))
    x = torch.randn(TOY_INPUT[dims])
    model = add_se(base, example_input=x, reduction=4, position=position).eval()
    widths = [b.fc1.in_channels for b in se_blocks(model).values()]
    assert widths == ([16, 16, 16, 32] if position == "pre" else [16, 16, 32, 32])  # SE-PRE sees the unit's input
    with torch.no_grad():
        assert model(x).shape == base(x).shape


def test_se_layer_is_one_block_for_every_rank():
    torch.manual_seed(0)
    for squeeze in ("avg", "max", "none"):
        se = SELayer(8, 2, squeeze=squeeze).eval()
        u = torch.randn(2, 8, 5, 7)
        with torch.no_grad():
            image = se(u)  # the same weights on the same values laid out as N x C x L and N x C x 1 x H x W
            torch.testing.assert_close(se(u.flatten(2)), image.flatten(2))
            torch.testing.assert_close(se(u.unsqueeze(2)), image.unsqueeze(2))
            scripted = torch.jit.script(se)
            torch.testing.assert_close(scripted(u.flatten(2)), image.flatten(2))
            skip = torch.randn(2, 8, 35)
            torch.testing.assert_close(se(u.flatten(2), skip), skip + image.flatten(2))
    assert se.fc1.weight.shape == (2, 8, 1, 1)
    with pytest.raises(SurgeryError, match="got a 2-D tensor, which has nothing to squeeze: pass it N x C x L"):
        se(torch.randn(2, 8))


def test_shape_check_uses_the_units_rank():
    assert check_shape_kept(SELayer(8, 2), 8, None, dims=1) is None
    assert check_shape_kept(SELayer(8, 2), 8, None, dims=3) is None
    assert check_shape_kept(SELayer(8, 2), 8, None) is None  # 2-D by default
    assert check_shape_kept(nn.BatchNorm2d(8), 8, None, dims=1).startswith("it fails on a 2 x 8 x 9 input")
    assert check_shape_kept(nn.Conv1d(8, 4, 1), 8, None, dims=1) == "it maps 2 x 8 x 9 to (2, 4, 9)"
    assert check_shape_kept(nn.BatchNorm3d(8), 8, None, dims=2).startswith("it fails on a 2 x 8 x 5 x 7 input")
    assert check_shape_kept(nn.BatchNorm3d(8), 8, None, dims=3) is None


# ---- what stays refused ----------------------------------------------------------------------------------


def test_token_sums_stay_refused_with_their_kind():
    (v,) = verdicts(TokenBlock(16), torch.randn(2, 5, 16))
    assert isinstance(v, Skipped) and v.kind is SkipKind.NOT_CHANNELS_FIRST and v.kind.value == "tokens"
    assert v.reason == ("a sum of 3-D tensors whose branch ends in a linear map over the last dimension: transformer "
                        "tokens, not N x C x L")
    (v,) = verdicts(TokenBlock(16), torch.randn(2, 2, 3, 5, 16))
    assert v.kind is SkipKind.NOT_CHANNELS_FIRST and v.reason.endswith("transformer tokens, not N x C x D x H x W")
    with pytest.raises(SurgeryError, match="no residual sum of Tokens1d can take an SE: 2 sum.s. where a sum of 3-D "
                                           "tensors whose branch ends in a linear map"):
        add_se(Tokens1d(), example_input=torch.randn(2, 2, 64))


def test_a_conv_over_transposed_tokens_is_not_channels_first():
    class ConvOverTokens(nn.Module):  # N x L x C tokens, a Conv1d over C and back: the sum is channels-last
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(16, 16, 3, padding=1)

        def forward(self, t):
            return t + self.conv(t.transpose(1, 2)).transpose(1, 2)

    (v,) = verdicts(ConvOverTokens(), torch.randn(2, 5, 16))
    assert v.kind is SkipKind.NOT_CHANNELS_FIRST and "moves dimensions (permute / reshape)" in v.reason

    class FunctionalConv(ConvOverTokens):  # channels-first N x C x L, a functional conv1d: a unit
        def forward(self, x):
            return x + torch.nn.functional.conv1d(torch.relu(self.conv(x)), self.conv.weight, padding=1)

    (v,) = verdicts(FunctionalConv(), torch.randn(2, 16, 5))
    assert isinstance(v, Residual) and v.channels == 16


# ---- the default probe and its errors -------------------------------------------------------------------


def test_default_probe_follows_the_first_convolution_and_the_declared_size():
    timm = pytest.importorskip("timm")

    def shapes(model):
        return [tuple(x.shape) for x in default_examples(model)]

    assert shapes(ResNetNd(1)) == [(2, 2, 256), (2, 2, 16000)]
    assert shapes(ResNetNd(3)) == [(2, 2, 16, 32, 32), (2, 2, 16, 112, 112)]
    assert shapes(torchvision.models.resnet18()) == [(2, 3, 64, 64), (2, 3, 224, 224), (2, 3, 299, 299)]
    assert shapes(timm.create_model("test_resnet")) == [(2, 3, 64, 64), (2, 3, 160, 160)]  # pretrained_cfg
    assert list(se_blocks(add_se(ResNetNd(1)))) == TOY_SE  # probed at L = 256


def test_default_probe_reads_a_hugging_face_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(depths=[1, 1], hidden_sizes=[8, 16], num_stages=2, image_size=96,
                                         num_channels=1)
    model = transformers.ConvNextModel(config)
    assert [tuple(x.shape) for x in default_examples(model)] == [(2, 1, 64, 64), (2, 1, 96, 96)]


def test_probe_first_retries_at_the_next_size():
    needs_100px = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(100), nn.Flatten())
    candidates = default_examples(needs_100px)
    probe, used = probe_first(needs_100px, candidates)
    assert used is candidates[1] and tuple(used.shape) == (2, 3, 224, 224)


def test_a_failed_probe_suggests_an_input_of_the_models_rank():
    model = ResNetNd(1)
    with pytest.raises(SurgeryError, match=r"failed on the example input of shape \(2, 2, 8, 8\).*"
                                           r"add_se\(model, example_input=torch.randn\(2, 2, 16000\)\)\.$"):
        probe_first(model, [torch.randn(2, 2, 8, 8), torch.randn(2, 3, 64)])
    with pytest.raises(SurgeryError, match=r"example_input=torch.randn\(2, 2, 16, 112, 112\)\)\.$"):
        add_se(ResNetNd(3), example_input=torch.randn(2, 2, 64))
    with pytest.raises(SurgeryError, match=r"pass e.g. example_input=torch.randn\(2, 2, 16000\), or leave it out"):
        add_se(model, example_input=[1, 2])


# ---- the analysis on 1-D and 3-D SE networks ------------------------------------------------------------


@pytest.mark.parametrize(("dims", "squeeze"), [(1, "avg"), (3, "avg"), (1, "none")])
def test_capture_and_fig6_study_on_a_1d_and_a_3d_se_model(dims, squeeze):
    torch.manual_seed(0)
    x = torch.randn(TOY_INPUT[dims])
    model = add_se(randomise(ResNetNd(dims)), example_input=x, reduction=4, squeeze=squeeze).eval()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 3
    signals = torch.randn(24, *TOY_INPUT[dims][1:], generator=g) + labels.view(-1, *(1,) * (dims + 1)).float()
    loader = DataLoader(LabelledImages(signals, labels, ["a", "b", "c"]), batch_size=8)
    stats = capture_excitations(model, loader)
    assert stats.blocks == TOY_SE and stats.paper_name("layer2.1.se") == "SE_3_2"
    gates = {}  # the reference: every gate output kept whole, averaged over positions for NoSqueeze
    se = model.get_submodule("layer2.1.se")
    hook = se.scale_activation.register_forward_hook(lambda m, a, out: gates.update(s=out.flatten(2).mean(2)))
    with torch.no_grad():
        model(signals)
    hook.remove()
    for k in range(3):
        assert stats.count("layer2.1.se", k) == 8
        torch.testing.assert_close(torch.from_numpy(stats.mean("layer2.1.se", k)).float(),
                                   gates["s"][labels == k].mean(0), rtol=1e-5, atol=1e-6)
    assert stats.mean("layer2.1.se", "a").shape == (32,)
    frame = metrics_frame(stats)
    assert list(frame["paper_name"]) == list(TOY_NAMES.values())
    assert len(plot_fig6(stats).axes) >= 3  # SE_2_2, SE_3_1, SE_3_2: the paper's choice
    rows = ablate(model, loader, ["layer2.1.se"], stats)
    assert list(rows["variant"]) == ["intact", "removed", "fixed"]
    assert rows["params_saved"].tolist()[1] == sum(p.numel() for p in se.parameters())
