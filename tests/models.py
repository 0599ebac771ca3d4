"""Small hand-written models for the tests: every way a residual sum is written, and ways it is not (the surgery's);
tiny SE networks with torchvision's or timm's SE blocks (the analysis's)."""

import torch
from timm.layers import SEModule
from torch import nn
from torchvision.ops import SqueezeExcitation


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class PlusBlock(nn.Module):
    """``x + f(x)``: skip first."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))

    def forward(self, x):
        return torch.relu(x + self.f(x))


class TorchAddBlock(nn.Module):
    """``torch.add(branch, proj(x))`` with a 1x1 projection + norm on the skip."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(cin, cout), conv_bn(cout, cout)
        self.proj = conv_bn(cin, cout, 1)

    def forward(self, x):
        return torch.add(self.conv2(torch.relu(self.conv1(x))), self.proj(x))


class InplaceBlock(nn.Module):
    """``out += x`` with a drop-path-like module and a layer-scale parameter after the last norm."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c, c), conv_bn(c, c)
        self.gamma = nn.Parameter(torch.full((1, c, 1, 1), 0.5))
        self.drop_path = nn.Dropout(0.0)

    def forward(self, x):
        out = self.conv2(torch.relu(self.conv1(x)))
        out = self.drop_path(out * self.gamma)
        out += x
        return out


class Nested(nn.Module):
    """A residual around two residual blocks: three sums, two of them inside children."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(PlusBlock(c), InplaceBlock(c))
        self.mix = conv_bn(c, c)

    def forward(self, x):
        return x.add(self.mix(self.inner(x)))


class TinyNet(nn.Module):
    """Every spelling at once, plus a residual sum in the top-level forward."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block1 = PlusBlock(16)
        self.block2 = TorchAddBlock(16, 32)
        self.nested = Nested(32)
        self.top = conv_bn(32, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.nested(self.block2(self.block1(torch.relu(self.stem(x)))))
        x = x + self.top(x)  # a sum in the model's own forward
        return self.head(x.mean((2, 3)))

    def features_dim(self) -> int:
        return self.head.in_features


class DataDependent(nn.Module):
    """A residual block fx cannot trace: Python control flow on a tensor's value."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = conv_bn(c, c)

    def forward(self, x):
        if x.mean() > 0:
            return x + self.f(x)
        return x + self.f(x) * 2


class TokenMixer(nn.Module):
    """A transformer-style residual over tokens (3-D): not an SE place."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.fc(t)
        return t.transpose(1, 2).reshape(n, c, h, w)


class Hybrid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block = PlusBlock(16)
        self.tokens = TokenMixer(16)
        self.untraceable = DataDependent(16)

    def forward(self, x):
        return self.untraceable(self.tokens(self.block(self.stem(x))))


class MethodBlock(PlusBlock):
    """A hand-written residual block with methods of its own, which must keep working after the surgery."""

    def width(self) -> int:
        return self.f[0][0].out_channels

    def zero_last(self) -> None:
        nn.init.zeros_(self.f[2][1].weight)


def clip_if_large(x: torch.Tensor) -> torch.Tensor:
    """Python control flow on a tensor value: fx can only keep it as an opaque call (autowrap_functions=)."""
    return x.clamp(-1, 1) if x.abs().max() > 1e6 else x


class WrappedHelperBlock(nn.Module):
    """Two residual sums in one forward, the first through a helper fx cannot trace."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))
        self.g = nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))

    def forward(self, x):
        y = x + clip_if_large(self.f(x))
        return y + self.g(y)


class Recalibration(nn.Module):
    """An SE under a name no registry entry knows. ``pooled``: written like Hugging Face's ``RegNetSELayer`` (a pool
    child, the excitation in a Sequential); else with an inline mean and a hard sigmoid, as timm writes its SEs."""

    def __init__(self, c: int, pooled: bool = True) -> None:
        super().__init__()
        self.pooler = nn.AdaptiveAvgPool2d((1, 1)) if pooled else None
        self.attention = nn.Sequential(nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1),
                                       nn.Sigmoid() if pooled else nn.Hardsigmoid())

    def forward(self, x):
        pooled = self.pooler(x) if self.pooler is not None else x.mean((2, 3), keepdim=True)
        return x * self.attention(pooled)


class CenteredSwish(nn.Module):
    """Pools, then multiplies, yet gates nothing: ``y * sigmoid(y)`` for ``y = x - mean(x)`` (no tensor is scaled by a
    function of its own pool)."""

    def forward(self, x):
        y = x - x.mean((2, 3), keepdim=True)
        return y * torch.sigmoid(y)


class RecalibratedBlock(nn.Module):
    """``x + F(x)`` with ``F`` ending in ``gate``; ``inline``: the gate's scaling written in the block's own forward
    (``u * hardsigmoid(fc(mean(u)))``) instead."""

    def __init__(self, c: int, gate: nn.Module | None = None, inline: bool = False) -> None:
        super().__init__()
        self.f = nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))
        self.gate = gate if gate is not None else nn.Identity()
        self.inline = nn.Sequential(nn.Conv2d(c, c, 1), nn.Hardsigmoid()) if inline else None

    def forward(self, x):
        u = self.gate(self.f(x))
        if self.inline is not None:
            u = u * self.inline(u.mean((2, 3), keepdim=True))
        return x + u


# ---- tiny SE networks for the analysis tests ----------------------------------------------------------------


class Block(nn.Module):
    """conv-bn -> SE -> relu, with its SE at ``.se`` (torchvision's or timm's)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, *, timm_se: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.se = SEModule(c_out, rd_ratio=0.25) if timm_se else SqueezeExcitation(c_out, max(c_out // 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.se(self.bn(self.conv(x))))


class TinySENet(nn.Module):
    """Two stages, three SE blocks: ``layer1.0.se``, ``layer1.1.se``, ``layer2.0.se``."""

    def __init__(self, num_classes: int = 4, *, timm_se: bool = False) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(Block(3, 8, timm_se=timm_se), Block(8, 8, timm_se=timm_se))
        self.layer2 = nn.Sequential(Block(8, 16, 2, timm_se=timm_se))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))
