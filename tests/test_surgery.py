"""add_se / remove_se / se_blocks / paper_names on the torchvision and timm zoos and hand-written models."""

import copy
import inspect
import io
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import convnext, mobilenetv2, regnet, resnet
from torchvision.ops import SqueezeExcitation

from se_surgery import SurgeryError, add_se, paper_names, remove_se, se_blocks

from .models import DataDependent, Hybrid, MethodBlock, TinyNet, WrappedHelperBlock, clip_if_large

X = torch.randn(2, 3, 64, 64)


def residual_blocks(model: nn.Module) -> int:
    """Independent count of residual sums: the zoo's own block classes (and their residual flag)."""
    kinds = (resnet.BasicBlock, resnet.Bottleneck, regnet.ResBottleneckBlock, convnext.CNBlock)
    count = sum(isinstance(m, kinds) for m in model.modules())
    count += sum(isinstance(m, mobilenetv2.InvertedResidual) and m.use_res_connect for m in model.modules())
    count += sum(type(m).__name__ in {"Bottleneck", "BasicBlock"} and "timm" in type(m).__module__
                 for m in model.modules())
    return count


def check_surgery(base: nn.Module, expected: int) -> nn.Module:
    se = add_se(base)
    blocks = se_blocks(se)
    assert len(blocks) == expected > 0
    assert type(se) is type(base)  # class (and so methods) kept
    classes = {name: type(m) for name, m in base.named_modules()}  # every block keeps its class too (a subclass)
    kept = [isinstance(m, classes[n]) and type(m).__name__ == classes[n].__name__
            for n, m in se.named_modules() if n in classes]
    assert len(kept) == len(classes) and all(kept)
    old, new = base.state_dict(), se.state_dict()
    assert set(old) <= set(new)
    assert all(torch.equal(old[k], new[k]) for k in old)
    extra = set(new) - set(old)
    assert extra == {f"{name}.{k}" for name, b in blocks.items() for k in b.state_dict()}
    missing, unexpected = se.load_state_dict(old, strict=False)  # pretrained weights load; only SE keys missing
    assert set(missing) == extra and not unexpected
    se.eval()
    with torch.no_grad():
        out = se(X)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    return se


@pytest.mark.parametrize(
    "arch",
    ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2",
     "mobilenet_v2", "regnet_x_400mf", "convnext_tiny"],
)
def test_torchvision_zoo(arch):
    base = torchvision.models.get_model(arch)
    check_surgery(base, residual_blocks(base))


def test_timm_resnet50():
    timm = pytest.importorskip("timm")
    base = timm.create_model("resnet50")
    se = check_surgery(base, 16)
    # timm blocks hold `se = None`; ours takes that slot, under the same key names as timm's seresnet50
    assert "layer1.0.se.fc1.weight" in se.state_dict()
    se.load_state_dict(timm.create_model("seresnet50").state_dict())  # timm's SE-ResNet-50 weights load, strictly


def test_resnet50_matches_the_paper_cost():
    from se_surgery import summary

    se = add_se(torchvision.models.resnet50())
    assert sum(p.numel() for p in se.parameters()) == 28_088_024  # paper: 25.6M -> 28.1M
    cost = summary(se, (1, 3, 224, 224))
    assert cost.params_base == 25_557_032
    assert 0 < cost.macs_overhead <= 0.003  # paper: 3.86 -> 3.87 GFLOPs


def test_channels_and_reduction_follow_the_block():
    se = add_se(torchvision.models.resnet50(), reduction=8)
    block = se_blocks(se)["layer4.1.se"]
    assert (block.fc1.in_channels, block.fc1.out_channels) == (2048, 256)


def test_matches_a_hand_written_se_resnet():
    """micrograd-style: the surgered ResNet-18 equals a forward written out by hand with the paper's equations."""
    torch.manual_seed(0)
    model = add_se(torchvision.models.resnet18()).eval()
    names = list(se_blocks(model))

    def se_ref(block: SqueezeExcitation, u):
        z = u.mean((2, 3))  # squeeze: z_c = 1/HW sum u_c
        s = torch.sigmoid(F.linear(F.relu(F.linear(z, block.fc1.weight[:, :, 0, 0], block.fc1.bias)),
                                   block.fc2.weight[:, :, 0, 0], block.fc2.bias))  # excitation
        return u * s[:, :, None, None]  # scale

    def basic(block, name, x):
        out = block.relu(block.bn1(block.conv1(x)))
        out = se_ref(se_blocks(model)[name], block.bn2(block.conv2(out)))
        identity = block.downsample(x) if block.downsample is not None else x
        return F.relu(out + identity)

    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(X))))
        i = 0
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                x = basic(block, names[i], x)
                i += 1
        ref = model.fc(torch.flatten(model.avgpool(x), 1))
        torch.testing.assert_close(model(X), ref, rtol=1e-5, atol=1e-5)


def test_hand_written_model_every_spelling_and_top_level_sum():
    base = TinyNet().eval()
    se = add_se(base, reduction=4)
    assert set(se_blocks(se)) == {"block1.se", "block2.se", "nested.se", "nested.inner.0.se", "nested.inner.1.se", "se"}
    assert isinstance(se, TinyNet) and type(se).__name__ == "TinyNet" and se.features_dim() == 32  # root kept too
    missing, unexpected = add_se(base, reduction=4).load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".se." in k or k.startswith("se.") for k in missing)
    assert set(base.state_dict()) <= set(se.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(remove_se(se).eval()(X), base(X), rtol=0, atol=0)
    # the SE of `out = drop_path(conv2 * gamma); out += x` sits before gamma
    assert "se = self.se(conv2" in inspect.getsource(type(se.nested.inner[1]).forward).replace("_1", "")


def test_remove_se_gives_back_the_original_function_bit_for_bit():
    base = torchvision.models.resnet50().eval()
    se = add_se(base)
    restored = remove_se(se)
    assert not se_blocks(restored) and len(se_blocks(se)) == 16  # the input is untouched
    assert restored.state_dict().keys() == base.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(restored(X), base(X))


def test_remove_some_by_paper_name():
    se = add_se(torchvision.models.resnet50())
    names = paper_names(se)
    assert names["layer1.2.se"] == "SE_2_3" and names["layer4.1.se"] == "SE_5_2" and names["layer3.5.se"] == "SE_4_6"
    assert list(se_blocks(se))[:3] == ["layer1.0.se", "layer1.1.se", "layer1.2.se"]
    lighter = remove_se(se, ["SE_5_1", "SE_5_2", "layer4.2.se"])
    assert len(se_blocks(lighter)) == 13 and not any(n.startswith("layer4") for n in se_blocks(lighter))
    with pytest.raises(SurgeryError, match="layer1.0.se"):
        remove_se(se, ["SE_9_9"])


@pytest.mark.parametrize(
    "where, prefixes",
    [([4], {"layer3"}), ([2, 5], {"layer1", "layer4"}), (["layer2", "layer4.1"], {"layer2", "layer4.1"}),
     (lambda owner: owner.endswith(".0"), {"layer1.0", "layer2.0", "layer3.0", "layer4.0"})],
)
def test_where_expresses_the_stage_ablation(where, prefixes):
    se = add_se(torchvision.models.resnet50(), where=where)
    owners = {n.rsplit(".", 1)[0] for n in se_blocks(se)}
    assert owners and all(any(o == p or o.startswith(p + ".") for p in prefixes) for o in owners)
    assert all(any(o == p or o.startswith(p + ".") for o in owners) for p in prefixes)


def test_where_that_matches_nothing_lists_the_blocks():
    with pytest.raises(SurgeryError, match=r"layer1\.0 \(SE_2_1\)"):
        add_se(torchvision.models.resnet18(), where=["layer9"])


def test_identity_init_keeps_a_pretrained_networks_outputs():
    base = torchvision.models.resnet50().eval()
    se = add_se(base, init="identity").eval()
    with torch.no_grad():
        y0, y1 = base(X), se(X)
    assert (y1 - y0).norm() / y0.norm() <= 1e-3
    gates = [b.fc2.bias for b in se_blocks(se).values()]
    assert all(torch.sigmoid(g).min() > 0.9999 for g in gates)


def test_he_init_is_not_identity():
    """The paper trains from scratch with He et al.'s init: weights ~ N(0, 2 / fan_in), biases zero."""
    torch.manual_seed(0)
    se = se_blocks(add_se(torchvision.models.resnet18()))["layer2.0.se"]  # C = 128, r = 16: fc1 128 -> 8, fc2 8 -> 128
    for fc in (se.fc1, se.fc2):
        fan_in = fc.weight[0].numel()  # in_channels x 1 x 1
        assert fc.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1), fc
        assert torch.count_nonzero(fc.bias) == 0


def test_save_load_deepcopy_script_compile():
    se = add_se(torchvision.models.resnet18()).eval()
    with torch.no_grad():
        ref = se(X)
        buffer = io.BytesIO()
        torch.save(se, buffer)
        buffer.seek(0)
        for other in (torch.load(buffer, weights_only=False), copy.deepcopy(se), torch.jit.script(se)):
            torch.testing.assert_close(other(X), ref, rtol=0, atol=0)
        compiled = torch.compile(se, backend="aot_eager")  # dynamo capture of the rewritten blocks
        torch.testing.assert_close(compiled(X), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False), resnet.ResNet)


def test_train_mode_and_gradients_after_surgery():
    base = torchvision.models.resnet18()
    se = add_se(base)
    assert se.training and all(m.training for m in se.modules())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    se(X).sum().backward()
    assert all(b.fc1.weight.grad is not None for b in se_blocks(se).values())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # running stats untouched


def test_inplace():
    base = torchvision.models.resnet18()
    se = add_se(base, inplace=True)
    assert se is base and len(se_blocks(base)) == 8


def unchanged(model: nn.Module, snapshot: dict, modules: list) -> bool:
    return list(model.modules()) == modules and all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())


def test_untraceable_block_names_the_module_and_leaves_the_model_untouched():
    model = Hybrid()
    snapshot, modules = copy.deepcopy(model.state_dict()), list(model.modules())
    for inplace in (False, True):  # strict=True: the untraceable block refuses the whole model, as it names
        with pytest.raises(SurgeryError, match=r"`untraceable` \(DataDependent\).*leaf_modules=\['untraceable'\]"):
            add_se(model, inplace=inplace, strict=True)
        assert unchanged(model, snapshot, modules)
    se = add_se(model, leaf_modules=[DataDependent])  # the way out: that block keeps no SE, the others get one
    assert list(se_blocks(se)) == ["block.se"]


def test_token_sums_are_skipped_and_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="se_surgery"):
        se = add_se(Hybrid(), leaf_modules=["untraceable"])
    assert list(se_blocks(se)) == ["block.se"]
    assert "tokens" in caplog.text and "3-D" in caplog.text


@pytest.mark.parametrize("model", [torchvision.models.vgg11, torchvision.models.densenet121])
def test_no_residual_sum(model):
    with pytest.raises(SurgeryError, match="no residual sum.*units='auto'"):
        add_se(model(), units="residual")


def test_already_gated_blocks_are_never_doubled(caplog):
    se = add_se(torchvision.models.resnet18())
    for gated in (se, torchvision.models.efficientnet_b0(), torchvision.models.regnet_y_400mf()):
        with pytest.raises(SurgeryError, match="already holds an SE"):
            add_se(gated)
    partly = add_se(torchvision.models.resnet18(), where=[2])
    with caplog.at_level(logging.WARNING, logger="se_surgery"):
        both = add_se(partly)
    assert len(se_blocks(both)) == 8 and "already holds an SE" in caplog.text


@pytest.mark.parametrize("r", [0, -2, 1.5, 65])
def test_bad_reduction(r):
    model = torchvision.models.resnet18()
    snapshot, modules = copy.deepcopy(model.state_dict()), list(model.modules())
    with pytest.raises(SurgeryError, match="reduction"):
        add_se(model, reduction=r, inplace=True, strict=True)  # 65 > layer1's 64 channels: refused when strict
    assert unchanged(model, snapshot, modules)


def test_bad_example_input():
    with pytest.raises(SurgeryError, match="example_input"):
        add_se(torchvision.models.resnet18(), example_input=torch.randn(2, 1, 64, 64))


def test_data_dependent_block_is_plain_fx_limit():
    with pytest.raises(SurgeryError, match="cannot trace"):
        add_se(nn.Sequential(nn.Conv2d(3, 8, 3), DataDependent(8)))


def test_in_place_add_on_the_branch_keeps_the_sum():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out.add_(x)  # mutates the branch; `out` is read again below
            return torch.relu(out)

    base = nn.Sequential(nn.Conv2d(3, 8, 1), Block()).eval()
    se = add_se(base, reduction=2, init="identity").eval()
    with torch.no_grad():
        torch.testing.assert_close(se(X), base(X), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(remove_se(se)(X), base(X), rtol=0, atol=0)


def test_children_keep_their_own_train_eval_flags():
    base = torchvision.models.resnet18().train()
    base.layer1[0].bn1.eval()  # a frozen BN while fine-tuning
    se = add_se(base)
    assert not se.layer1[0].bn1.training and se.layer1[0].bn2.training
    from se_surgery import summary

    summary(se, (1, 3, 32, 32))
    assert not se.layer1[0].bn1.training and se.layer1[0].bn2.training


def test_indexed_container_keeps_its_type_and_every_key():
    class Stage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            y = x
            for block in self.blocks[:2]:  # the third block is never used
                y = block(y)
            return x + self.bn(y)

    base = nn.Sequential(nn.Conv2d(3, 8, 1), Stage())
    se = add_se(base, reduction=2)
    assert isinstance(se[1].blocks, nn.ModuleList) and len(se[1].blocks) == 3
    assert set(base.state_dict()) <= set(se.state_dict())


def test_a_block_that_branches_on_self_training_is_refused():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + F.dropout(self.conv(x), 0.5, self.training)

    with pytest.raises(SurgeryError, match="self.training.*leaf_modules"):
        add_se(nn.Sequential(nn.Conv2d(3, 8, 1), Block()))


def test_paper_names_survive_where_and_forward_order():
    regnet = add_se(torchvision.models.regnet_x_400mf(), where=[4])
    names = paper_names(regnet)
    assert set(names.values()) == {f"SE_4_{i}" for i in range(1, len(names) + 1)}
    assert len(se_blocks(remove_se(regnet, ["SE_4_1"]))) == len(names) - 1
    assert list(se_blocks(add_se(TinyNet(), where="block1"))) == ["block1.se"]
    top_first = add_se(TinyNet(), reduction=4)
    assert list(se_blocks(top_first))[-1] == "se"  # the top-level sum runs last


def test_one_channel_model_gets_a_fitting_example_input():
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), TinyNet().block1)
    assert list(se_blocks(add_se(model, reduction=2))) == ["1.se"]


def test_summary_cli_refuses_a_transformer_in_one_line():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "se_surgery.describe", "vit_b_16", "--input-size", "224"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "VisionTransformer can take an SE" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_two_sums_in_one_block_get_se_and_se_1_in_forward_order():
    from .models import conv_bn

    class TwoSums(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f, self.g = conv_bn(8, 8), conv_bn(8, 8)

        def forward(self, x):
            x = x + self.f(x)
            return x + self.g(x)

    base = nn.Sequential(nn.Conv2d(3, 8, 1), TwoSums()).eval()
    se = add_se(base, reduction=2).eval()
    assert list(se_blocks(se)) == ["1.se", "1.se_1"]
    seen = {}
    for name, block in se_blocks(se).items():  # a copy: in inference the fused SE writes the sum into u's storage
        block.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args[0].clone()))
    with torch.no_grad():
        se(X)
        stem = se[0](X)
    assert list(seen) == ["1.se", "1.se_1"]  # se on the first sum's branch, se_1 on the second's
    torch.testing.assert_close(seen["1.se"], se[1].f(stem))


def test_remove_se_gives_timm_its_se_none_slot_back():
    timm = pytest.importorskip("timm")
    base = timm.create_model("resnet18").eval()
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert all(base.get_submodule(b).se is None for b in blocks)
    restored = remove_se(add_se(base)).eval()
    assert all(restored.get_submodule(b).se is None for b in blocks)  # the slot is back, holding None again
    with torch.no_grad():
        assert torch.equal(restored(X), base(X))


def test_blocks_keep_their_class_methods_and_state_dict_order():
    base = nn.Sequential(nn.Conv2d(3, 8, 1), MethodBlock(8)).eval()
    se = add_se(base, reduction=2, position="post").eval()
    block = se[1]
    assert isinstance(block, MethodBlock) and type(block).__name__ == "MethodBlock" and type(block) is not MethodBlock
    assert block.width() == 8
    assert [k for k in se.state_dict() if ".se." not in k] == list(base.state_dict())  # same keys, same order
    block.zero_last()  # a method of the original class, acting on the live submodules the new forward runs
    assert torch.count_nonzero(block.f[2][1].weight) == 0 and torch.count_nonzero(base[1].f[2][1].weight) > 0
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():  # branch = BN bias = 0: the block computes se(relu(x)) (SE-POST)
        torch.testing.assert_close(block(x), block.se(torch.relu(x)))


def test_timm_zero_init_last_reaches_the_rewritten_blocks():
    timm = pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock

    se = add_se(timm.create_model("resnet18"))
    assert all(isinstance(se.get_submodule(n.rpartition(".")[0]), BasicBlock) for n in se_blocks(se))
    se.init_weights(zero_init_last=True)  # timm calls each block's zero_init_last()
    assert all(torch.count_nonzero(m.bn2.weight) == 0 for m in se.modules() if isinstance(m, BasicBlock))


def test_saved_model_loads_in_a_fresh_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    model = add_se(nn.Sequential(nn.Conv2d(3, 16, 1), MethodBlock(16), TinyNet().block2), reduction=2,
                   position="identity", squeeze="none").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.save({"model": model, "x": x, "y": model(x)}, tmp_path / "m.pt")
    code = (
        "import torch, se_surgery; d = torch.load(r'%s', weights_only=False); m = d['model']; "
        "assert torch.equal(m(d['x']), d['y']); "
        "print([type(b).__name__ for b in m], list(se_surgery.se_blocks(m)), m[1].width())" % (tmp_path / "m.pt")
    )
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['Conv2d', 'MethodBlock', 'TorchAddBlock'] ['1.se', '2.se'] 16"


def test_variants_deepcopy_script_and_compile():
    torch.manual_seed(0)
    model = add_se(TinyNet(), reduction=4, position="pre", squeeze="max", excitation="tanh").eval()
    assert isinstance(model, TinyNet) and model.features_dim() == 32  # the root owns a sum and keeps its class
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        for other in (copy.deepcopy(model), torch.jit.script(model)):
            torch.testing.assert_close(other(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), ref, rtol=1e-5, atol=1e-5)
    assert type(copy.deepcopy(model).nested).__name__ == "Nested"


def test_remove_se_gives_back_the_original_classes():
    se = add_se(torchvision.models.resnet18())
    some = remove_se(se, ["SE_2_1"])
    assert type(some.layer1[0]) is resnet.BasicBlock and type(some.layer1[1]) is not resnet.BasicBlock
    loaded = torch.load(_saved(se), weights_only=False)  # a model rebuilt from a pickle edits the same way
    assert all(type(m) is resnet.BasicBlock for m in remove_se(loaded).modules() if isinstance(m, resnet.BasicBlock))


def _saved(model: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def test_autowrapped_helpers_stay_opaque_through_add_and_remove():
    base = nn.Sequential(nn.Conv2d(3, 8, 1), WrappedHelperBlock(8)).eval()
    with pytest.raises(SurgeryError, match="autowrap_functions"):
        add_se(base)
    se = add_se(base, reduction=2, autowrap_functions=[clip_if_large], init="identity")
    assert list(se_blocks(se)) == ["1.se", "1.se_1"]
    loaded = torch.load(_saved(se), weights_only=False)
    one = remove_se(loaded, ["1.se"])  # re-traces the generated forward: the helper must stay one opaque call
    assert list(se_blocks(one)) == ["1.se_1"] and isinstance(one[1], WrappedHelperBlock)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        block, h = one[1].eval(), one[0](x)
        y = h + clip_if_large(block.f(h))
        torch.testing.assert_close(block(h), block.se_1(block.g(y), y), rtol=0, atol=0)  # fused: y + g(y) * s
        assert torch.equal(remove_se(one)(x), base(x))
