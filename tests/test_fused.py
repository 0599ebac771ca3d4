"""The fused SE (``skip + u * s`` in one pass, add_se's default) against the unfused form and timm's SE-ResNet-50:
same outputs, gradients, gates, weights after training steps, state_dict keys; remove_se exact."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet

from se_surgery import add_se, paper_names, remove_se, se_blocks

from .models import InplaceBlock
from .test_surgery_variants import randomise_norms

LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}
# float64 shows the two forms are the same function (to 1e-10), in eval and train mode. In float32 and bfloat16 they
# round differently (one fused multiply-add instead of two roundings): there each tensor's error against float64
# stays within three times the unfused one plus a floor (bfloat16's 8-bit mantissa gives both forms errors of a few %
# on some gradients), in eval mode (train-mode BatchNorm over the 2 x 2 maps of these small inputs turns bfloat16
# gradients into noise for both forms).
LOW_PRECISION = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bottleneck_net() -> nn.Module:
    """Two Bottlenecks (one with a projection) and a classifier: the blocks of ResNet-50."""
    projection = nn.Sequential(nn.Conv2d(16, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), resnet.Bottleneck(16, 16, 2, projection),
                         resnet.Bottleneck(64, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))


MODELS = {"resnet18": (lambda: torchvision.models.resnet18(num_classes=5), 32), "bottleneck": (bottleneck_net, 16)}


def pair(make, dtype=torch.float32, layout=torch.contiguous_format):
    """(fused, unfused) SE versions of one randomised base network, with the same SE weights."""
    torch.manual_seed(0)
    base = randomise_norms(make())
    fused, unfused = add_se(base), add_se(base, fuse=False)
    unfused.load_state_dict(fused.state_dict())
    return [m.to(dtype=dtype, memory_format=layout) for m in (fused, unfused)]


def test_fusion_is_recorded_and_is_the_default():
    fused, unfused = pair(MODELS["bottleneck"][0])
    assert [b._se_surgery["fused"] for b in se_blocks(fused).values()] == [True, True]
    assert [b._se_surgery["fused"] for b in se_blocks(unfused).values()] == [False, False]
    assert "self.se(bn3, downsample, True)" in type(fused[1])._se_surgery_source  # branch, skip, write into bn3
    assert "self.se(bn3)" in type(unfused[1])._se_surgery_source
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    assert all(v.shape == unfused.state_dict()[k].shape for k, v in fused.state_dict().items())


def outputs_and_gradients(model: nn.Module, x: torch.Tensor, train: bool = False) -> dict[str, torch.Tensor]:
    """Output under no_grad (the fused sum then writes into the branch tensor), and the input and parameter
    gradients of a loss (the fused sum out of place), in eval or train mode."""
    model.train(train)
    kept = x.clone()
    with torch.no_grad():
        found = {"output": model(x)}
    assert torch.equal(x, kept)  # the input (a skip) is never written into
    x = x.clone().requires_grad_()
    model.zero_grad()
    model(x).float().square().mean().backward()
    found["input gradient"] = x.grad
    found.update((k, p.grad) for k, p in model.named_parameters())
    return found


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", list(MODELS))
def test_fused_and_unfused_agree(model, layout):
    make, size = MODELS[model]
    x = torch.randn(4, 3, size, size, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    fused64, unfused64 = pair(make, torch.float64, LAYOUTS[layout])
    for train in (True, False):
        exact = [outputs_and_gradients(m, x, train) for m in (fused64, unfused64)]
        assert exact[0].keys() == exact[1].keys() and len(exact[0]) > 20
        for k, v in exact[0].items():
            torch.testing.assert_close(v, exact[1][k], rtol=1e-9, atol=1e-12, msg=f"train={train} {k}")
    for dtype, floor in LOW_PRECISION.items():  # against the eval-mode float64 figures
        fused, unfused = (outputs_and_gradients(m, x.to(dtype)) for m in pair(make, dtype, LAYOUTS[layout]))
        for k, v in exact[0].items():
            fused_error, unfused_error = relative_error(fused[k], v), relative_error(unfused[k], v)
            assert fused_error <= 3 * unfused_error + floor, (dtype, k, fused_error, unfused_error)


def test_hooks_on_scale_activation_see_the_gate_in_both():
    fused, unfused = (m.eval() for m in pair(MODELS["resnet18"][0]))
    seen = {}
    for tag, m in (("fused", fused), ("unfused", unfused)):
        for name, se in se_blocks(m).items():
            se.scale_activation.register_forward_hook(lambda mod, i, o, key=(tag, name): seen.setdefault(key, o))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused(x), unfused(x)
    names = list(se_blocks(fused))
    assert len(names) == 8 and len(seen) == 16
    for name in names:
        s = seen["fused", name]
        assert s.shape == (2, se_blocks(fused)[name].fc2.out_channels, 1, 1) and ((s > 0) & (s < 1)).all()
        torch.testing.assert_close(s, seen["unfused", name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_remove_se_after_fusion_is_the_original_bit_for_bit(layout):
    torch.manual_seed(0)
    base = randomise_norms(torchvision.models.resnet18()).to(memory_format=LAYOUTS[layout])
    plain = remove_se(add_se(base))
    assert all(type(a) is type(b) for a, b in zip(plain.modules(), base.modules()))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=LAYOUTS[layout])
    with torch.no_grad():
        assert torch.equal(plain(x), base(x))
    # removing some: the rest stays fused, and the model is the unfused one with those removed
    fused, unfused = pair(MODELS["resnet18"][0])
    some = ["layer4.0.se", "SE_2_1"]
    part_fused, part_unfused = remove_se(fused, some).eval(), remove_se(unfused, some).eval()
    assert list(se_blocks(part_fused)) == list(se_blocks(part_unfused)) and len(se_blocks(part_fused)) == 6
    assert all(b._se_surgery["fused"] for b in se_blocks(part_fused).values())
    with torch.no_grad():
        torch.testing.assert_close(part_fused(x.contiguous()), part_unfused(x.contiguous()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, size, rel", [(torch.float64, 32, 1e-10), (torch.float32, 64, 1e-2)])
def test_training_steps_give_the_same_weights(dtype, size, rel):
    """The digits demo trains with the fused default (tests/test_train.py); here three SGD steps on the same batches
    leave fused and unfused networks with the same weights and BN statistics: to 1e-10 in float64; in float32 the
    different rounding grows through train-mode BatchNorm to about 0.2% of a tensor after three steps."""
    fused, unfused = pair(MODELS["resnet18"][0], dtype)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, size, size, generator=g).to(dtype), torch.randint(0, 5, (8,), generator=g))
               for _ in range(3)]
    for m in (fused, unfused):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    after = unfused.state_dict()
    for k, v in fused.state_dict().items():
        if v.is_floating_point():
            assert relative_error(v, after[k]) < rel, k
    trained = [k for k, v in fused.state_dict().items()
               if k.endswith("se.fc1.weight") and relative_error(v, before[k]) > 1e-3]
    assert len(trained) == 8  # every SE did train


def test_what_stays_unfused():
    block = nn.Sequential(nn.Conv2d(3, 8, 1), InplaceBlock(8))  # drop-path and layer-scale between SE and sum
    assert not se_blocks(add_se(block, reduction=2))["1.se"]._se_surgery["fused"]
    for options in ({"position": "pre"}, {"position": "post"}, {"position": "identity"}, {"position": "3x3"},
                    {"se_layer": lambda c: nn.Identity()}):
        model = add_se(torchvision.models.resnet18(), **options)
        assert not any(b._se_surgery["fused"] for b in se_blocks(model).values()), options


def test_a_fused_model_is_not_gated_twice_and_keeps_its_names():
    base = torchvision.models.resnet18()
    both = add_se(add_se(base, where=[2]))  # stage 2 fused, then the rest
    assert paper_names(both) == paper_names(add_se(base))
    assert list(se_blocks(both)) == list(se_blocks(add_se(base)))


def test_timm_seresnet50_weights_load_and_give_timm_outputs():
    timm = pytest.importorskip("timm")
    reference = randomise_norms(timm.create_model("seresnet50", num_classes=10))
    ours = add_se(timm.create_model("resnet50", num_classes=10))
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert all(b._se_surgery["fused"] for b in se_blocks(ours).values()) and len(se_blocks(ours)) == 16
    ours.eval()
    for layout in LAYOUTS.values():
        x = torch.randn(2, 3, 64, 64).contiguous(memory_format=layout)
        reference, ours = reference.to(memory_format=layout), ours.to(memory_format=layout)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
