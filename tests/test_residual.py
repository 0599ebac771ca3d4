"""The branch/skip rule on fx graphs, alone (se_surgery.surgery.residual)."""

import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

from se_surgery.surgery.residual import Residual, Skipped, classify_sum, find_sums
from se_surgery.surgery.tracing import propagate_shapes, trace_module

from .models import InplaceBlock, PlusBlock, TorchAddBlock, conv_bn


def verdicts(module: nn.Module, x: torch.Tensor):
    graph = trace_module(module, "m")
    propagate_shapes(module, graph, "m", (x,), {})
    order = {n: i for i, n in enumerate(graph.nodes)}
    modules = dict(module.named_modules())
    return [classify_sum(add, a, b, modules, order) for add, a, b in find_sums(graph)]


def test_operand_order_does_not_matter():
    class BranchFirst(PlusBlock):
        def forward(self, x):
            return self.f(x) + x

    for block in (PlusBlock(8), BranchFirst(8)):
        (v,) = verdicts(block, torch.randn(2, 8, 6, 6))
        assert isinstance(v, Residual)
        assert v.branch.target == "f" and v.skip.op == "placeholder" and v.channels == 8


def test_projection_skip_and_insertion_before_layer_scale_and_drop_path():
    (v,) = verdicts(TorchAddBlock(4, 8), torch.randn(2, 4, 6, 6))
    assert isinstance(v, Residual) and v.skip.target == "proj" and v.insert_after.target == "conv2"
    (v,) = verdicts(InplaceBlock(8), torch.randn(2, 8, 6, 6))
    # out = drop_path(conv2(...) * gamma); out += x  ->  the SE scales conv2's output, before gamma and drop-path
    assert isinstance(v, Residual) and v.insert_after.target == "conv2"


class TwoBranches(nn.Module):
    """``a(x) + b(x)`` with ``na`` and ``nb`` conv layers on the two sides."""

    def __init__(self, na: int, nb: int) -> None:
        super().__init__()
        self.a = nn.Sequential(*[conv_bn(8, 8) for _ in range(na)])
        self.b = nn.Sequential(*[conv_bn(8, 8) for _ in range(nb)])

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_ties_and_heavy_skips_are_not_residual():
    (tie,) = verdicts(TwoBranches(2, 2), torch.randn(2, 8, 6, 6))
    assert isinstance(tie, Skipped) and "neither is the skip" in tie.reason
    (heavy,) = verdicts(TwoBranches(3, 2), torch.randn(2, 8, 6, 6))
    assert isinstance(heavy, Skipped) and "at most one" in heavy.reason
    (ok,) = verdicts(TwoBranches(3, 1), torch.randn(2, 8, 6, 6))
    assert isinstance(ok, Residual) and ok.branch.target == "a"


def test_gated_branch_and_token_sums_are_skipped():
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(conv_bn(16, 16), SqueezeExcitation(16, 4))

        def forward(self, x):
            return x + self.f(x)

    (v,) = verdicts(Gated(), torch.randn(2, 16, 6, 6))
    assert isinstance(v, Skipped) and "gate" in v.reason

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, t):
            return t + self.fc(t)

    (v,) = verdicts(Tokens(), torch.randn(2, 5, 8))
    assert isinstance(v, Skipped) and "3-D" in v.reason


def test_swish_is_not_a_gate():
    class Swish(PlusBlock):
        def forward(self, x):
            y = self.f(x)
            return x + y * torch.sigmoid(y)

    (v,) = verdicts(Swish(8), torch.randn(2, 8, 6, 6))
    assert isinstance(v, Residual)


class NHWCBlock(nn.Module):  # Swin-style: x is N x H x W x C and the MLP acts on the last dim
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))

    def forward(self, x):
        return x + self.mlp(x)


def test_channels_last_token_mlp_is_not_an_se_place():
    (v,) = verdicts(NHWCBlock(), torch.randn(2, 6, 6, 8))
    assert isinstance(v, Skipped) and "not N x C x H x W" in v.reason


def test_a_linear_over_the_last_dim_is_channels_last_even_when_dim_1_has_its_width():
    # MaxViT-style N x windows x tokens x C with as many windows as channels
    (v,) = verdicts(NHWCBlock(), torch.randn(2, 8, 5, 8))
    assert isinstance(v, Skipped) and "channels-last" in v.reason

    class Permuted(NHWCBlock):  # ConvNeXt-style: N x C x H x W, the MLP runs channels-last and permutes back
        def forward(self, x):
            return x + self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    (v,) = verdicts(Permuted(), torch.randn(2, 8, 8, 8))
    assert isinstance(v, Residual) and v.channels == 8
