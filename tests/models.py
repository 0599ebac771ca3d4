"""Small hand-written models for the tests: every way a residual sum is written, and ways it is not (the surgery's);
tiny SE networks with torchvision's or timm's SE blocks (the analysis's)."""

import torch
import torch.nn.functional as F
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


# ---- plain and multi-branch networks (SENet Sec. 3.3) ------------------------------------------------------------


class TinyVGG(nn.Module):
    """A VGG in miniature: ``features`` is a Sequential of conv (+ BN) + ReLU, pools between; 3 convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """MobileNet's depthwise separable convolution: depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class TinyMobileNet(nn.Module):
    """A MobileNetV1 in miniature: a standard-conv stem, then three depthwise separable units."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.units = nn.Sequential(separable(16, 32), separable(32, 64, 2), separable(64, 64))
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


class BasicConv(nn.Module):
    """GoogLeNet's conv + BN + functional ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, **kwargs) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, k, bias=False, **kwargs), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionBlock(nn.Module):
    """Four parallel branches joined along channels; the 3x3 branch splits into 1x3 and 3x1 halves first, as
    Inception-v3's InceptionE does (an inner concatenation)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = BasicConv(cin, 8)
        self.b3 = BasicConv(cin, 8)
        self.b3a, self.b3b = BasicConv(8, 8, (1, 3), padding=(0, 1)), BasicConv(8, 8, (3, 1), padding=(1, 0))
        self.pool = BasicConv(cin, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.b3(x)
        b3 = torch.cat([self.b3a(b3), self.b3b(b3)], 1)
        pooled = self.pool(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([self.b1(x), b3, pooled], 1)


class Reduction(nn.Module):
    """Inception's grid reduction: a strided conv branch beside a max-pool of the input."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = BasicConv(cin, 16, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), F.max_pool2d(x, 3, 2, 1)], 1)


class TinyInception(nn.Module):
    """A GoogLeNet in miniature: a stem conv, two Inception modules around a reduction."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = BasicConv(3, 16, 3, padding=1)
        self.a, self.red, self.b = InceptionBlock(16), Reduction(32), InceptionBlock(48)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.red(self.a(self.stem(x)))).mean((2, 3)))


class DenseLayer(nn.Module):
    """DenseNet's layer: BN-ReLU-conv on the concatenation of every earlier feature map, k = 8 new channels."""

    def __init__(self, cin: int, growth: int = 8) -> None:
        super().__init__()
        self.norm, self.relu = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.relu(self.norm(torch.cat(features, 1))))


class DenseBlock(nn.ModuleDict):
    """DenseNet's block: each layer reads all earlier maps; the output joins them all (torchvision's layout)."""

    def __init__(self, cin: int, layers: int = 3, growth: int = 8) -> None:
        super().__init__({f"layer{i + 1}": DenseLayer(cin + i * growth, growth) for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def tiny_densenet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), DenseBlock(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(40, 5))


class TappedBlock(PlusBlock):
    """A residual block whose class computes its sum in a second method too, as timm's XceptionModule does with
    ``forward_with_tap`` (which its ``forward_intermediates`` calls)."""

    def forward_with_tap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tap = self.f(x)
        return torch.relu(x + tap), tap


# ---- 1-D and 3-D residual networks (audio / sensor data, video / volumes) ------------------------------------


_LAYERS = {1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d), 3: (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d)}


class BasicBlockNd(nn.Module):
    """torchvision's basic block over N x C x L (``dims=1``) or N x C x D x H x W (``dims=3``): conv-bn-relu-conv-bn,
    ``out += identity`` with a 1x1 projection + norm when the shape changes."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        conv, bn, _ = _LAYERS[dims]
        self.conv1, self.bn1 = conv(cin, cout, 3, stride, 1, bias=False), bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv(cout, cout, 3, 1, 1, bias=False), bn(cout)
        self.downsample = (nn.Sequential(conv(cin, cout, 1, stride, bias=False), bn(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetNd(nn.Module):
    """A small ResNet in 1-D (an ECG / audio net) or 3-D (a volume net): a stem, then ``layer1`` and ``layer2`` of two
    basic blocks each (paper names SE_2_1, SE_2_2, SE_3_1, SE_3_2), global pool and a linear head."""

    def __init__(self, dims: int = 1, in_channels: int = 2, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        conv, bn, pool = _LAYERS[dims]
        self.stem = nn.Sequential(conv(in_channels, width, 3, 1, 1, bias=False), bn(width), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlockNd(dims, width, width), BasicBlockNd(dims, width, width))
        self.layer2 = nn.Sequential(BasicBlockNd(dims, width, 2 * width, 2), BasicBlockNd(dims, 2 * width, 2 * width))
        self.pool = pool(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))


class TokenBlock(nn.Module):
    """A pre-norm transformer MLP block over N x L x C tokens: ``x + fc2(gelu(fc1(norm(x))))``, a Linear branch."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Tokens1d(nn.Module):
    """A Conv1d patch embedding, then token blocks over N x L x C: a 1-D model whose only sums are tokens."""

    def __init__(self, in_channels: int = 2, c: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv1d(in_channels, c, 4, 4)
        self.blocks = nn.Sequential(TokenBlock(c), TokenBlock(c))

    def forward(self, x):
        return self.blocks(self.embed(x).transpose(1, 2)).mean(1)
