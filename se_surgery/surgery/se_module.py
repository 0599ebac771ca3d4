"""The SE block of the paper's design space: torchvision's ``SqueezeExcitation`` with the squeeze, excitation and bias
variants of the SENet ablations (Tables 11, 12, 16), its gate computable apart from the scaling, and the scaling
fusable with the residual sum that follows it (the released Caffe SENet's Axpy layer). One block serves channels-first
tensors of any rank, N x C x L, N x C x H x W and N x C x D x H x W: the squeeze reduces every dimension after C."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import SqueezeExcitation

from ..errors import SurgeryError
from .fused_grad import fusable, fused_scale

__all__ = ["SELayer", "SQUEEZES", "EXCITATIONS"]

Squeeze = Literal["avg", "max", "none"]
Excitation = Literal["sigmoid", "tanh", "relu"]
SQUEEZES: dict[str, type[nn.Module]] = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d, "none": nn.Identity}
EXCITATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
# sigmoid(10) = 0.99995 and tanh(10) = 1 - 4e-9: the gates start at 1 to within 5e-5, so a pretrained network's outputs
# barely move. The price: sigmoid' is 4.5e-5 there and fc2 starts at zero, so the gates leave 1 slowly; a smaller bias
# (6-7) would learn faster but changes a deep network's outputs by more than 1e-3 at the start. relu(1) = 1 exactly.
_IDENTITY_BIAS = {"sigmoid": 10.0, "tanh": 10.0, "relu": 1.0}


def global_mean(u: Tensor) -> Tensor:
    """z_c = 1/HW sum_ij u_c(i, j) (SENet Eq. 2) as an N x C matrix, reading u once in its own memory layout.

    A channels-last float32 u is a contiguous N x HW x C matrix, so its mean is one matrix-vector product per image,
    which CPUs run faster than ``u.mean((2, 3))``'s reduction over a strided dimension.
    """
    n, c, h, w = u.shape
    if (
        u.dtype == torch.float32
        and h * w > 1
        and u.is_contiguous(memory_format=torch.channels_last)
        and not u.is_contiguous()
    ):
        rows = u.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view: no copy
        return torch.matmul(u.new_full((1, h * w), 1.0 / (h * w)), rows).view(n, c)
    return u.mean((2, 3))


def _pointwise(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1 convolution (``weight``: out x in x 1 x 1) at every position of a channels-first ``x`` of rank >= 3."""
    weight = weight.flatten(1)
    if x.dim() == 5:
        return F.conv3d(x, weight.view(weight.shape[0], weight.shape[1], 1, 1, 1), bias)
    out = F.conv1d(x.flatten(2), weight.view(weight.shape[0], weight.shape[1], 1), bias)
    return out.view([x.shape[0], weight.shape[0]] + list(x.shape[2:]))


class SELayer(SqueezeExcitation):
    """Squeeze (z = pool(u)), excitation (s = sigma(W2 delta(W1 z))) and scale (u * s), SENet Eq. 2-4.

    u is channels-first of any rank (N x C x L, N x C x H x W, N x C x D x H x W): the squeeze reduces every dimension
    after C and s broadcasts over them (N x C x 1, N x C x 1 x 1, ...). ``fc1`` and ``fc2`` stay 1x1 ``Conv2d``
    modules whatever the rank, so one state_dict loads into the block of a 1-D, 2-D or 3-D network.

    Keeps torchvision's names (``avgpool`` for the squeeze, whatever its kind, ``fc1`` = W1, ``fc2`` = W2,
    ``activation`` = delta, ``scale_activation`` = sigma) so timm's and torchvision's SE weights load, and the gate
    s is the output of ``scale_activation`` (a module call, so hooks on it see s). For a pooled squeeze the
    excitation runs as two matrix products on the flattened 1x1 weights (``F.linear``), not as convolutions on a
    1 x 1 map: ``avgpool``, ``fc1`` and ``fc2`` are not called as modules, so hooks on them do not fire.

    Args:
        channels: C, the width of the tensor u it scales.
        hidden: C // r, the excitation's hidden width.
        squeeze: ``"avg"`` (global average pooling, the paper's choice), ``"max"`` (global max pooling, Table 11) or
            ``"none"`` (NoSqueeze, Sec. 7.1 / Table 16: fc1 and fc2 run as 1x1 convolutions at full resolution, so
            the gate s has u's shape; same parameters).
        excitation: sigma: ``"sigmoid"`` (the paper's), ``"tanh"`` or ``"relu"`` (Table 12).
        bias: fc1 and fc2 with biases (the released Caffe models, timm) or without (the paper's ablation runs).
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        *,
        squeeze: Squeeze = "avg",
        excitation: Excitation = "sigmoid",
        bias: bool = True,
    ) -> None:
        super().__init__(channels, hidden, scale_activation=EXCITATIONS[excitation])
        self.avgpool = SQUEEZES[squeeze](1)  # nn.Identity for NoSqueeze
        if not bias:
            self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
            self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.excitation = excitation
        self.squeeze = squeeze

    def reset_parameters(self, identity: bool = False) -> None:
        """He initialisation (the paper trains from scratch), or ``identity``: fc2 = 0 and a bias that opens every
        gate (s = 1 to within 5e-5), so a pretrained network's outputs are kept (this needs fc2's bias)."""
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)
        if identity:
            nn.init.zeros_(self.fc2.weight)
            if self.fc2.bias is not None:
                nn.init.constant_(self.fc2.bias, _IDENTITY_BIAS[self.excitation])

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """As nn.Module's, but a pooled squeeze's 1x1 FC weights keep standard strides: ``model.to(memory_format=
        torch.channels_last)`` would give them channels-last strides, while their gradients (from ``F.linear`` on the
        flattened weights) come back in standard ones, which DDP's gradient buckets reject with a warning and a copy."""
        out = super()._apply(fn, recurse)
        if getattr(self, "squeeze", "avg") != "none":
            for fc in (self.fc1, self.fc2):
                standard = fc.weight.clone(memory_format=torch.contiguous_format)
                if fc.weight.stride() != standard.stride():
                    fc.weight.data = standard
        return out

    def gate(self, u: Tensor) -> Tensor:
        """The excitation s: N x C x 1 x 1 for an N x C x H x W u (N x C x 1 for N x C x L, N x C x 1 x 1 x 1 for
        N x C x D x H x W; u's shape for NoSqueeze), the output of ``scale_activation``."""
        rank = u.dim()
        if rank < 3:
            raise SurgeryError(f"SELayer got a {rank}-D tensor, which has nothing to squeeze: pass it N x C x L, "
                               "N x C x H x W or N x C x D x H x W")
        if self.squeeze == "none":  # fc1 and fc2 as 1x1 convolutions at full resolution
            if rank == 4:
                return self._scale(u)
            hidden = self.activation(_pointwise(u, self.fc1.weight, self.fc1.bias))
            return self.scale_activation(_pointwise(hidden, self.fc2.weight, self.fc2.bias))
        return self._excite(self._squeezed(u), rank)[1]

    def _squeezed(self, u: Tensor) -> Tensor:
        """z, the pooled squeeze of u (rank >= 3) as an N x C matrix."""
        rank = u.dim()
        if self.squeeze == "avg":
            return global_mean(u) if rank == 4 else u.mean(list(range(2, rank)))
        return u.amax(list(range(2, rank)))

    def _excite(self, z: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """fc1's activated output (N x C // r) and the gate s (N x C x 1 ... with ``rank`` dimensions) of a pooled
        squeeze z (N x C), through the block's modules."""
        hidden = self.activation(F.linear(z, self.fc1.weight.flatten(1), self.fc1.bias))
        logits = F.linear(hidden, self.fc2.weight.flatten(1), self.fc2.bias)
        return hidden, self.scale_activation(logits.view([logits.shape[0], logits.shape[1]] + [1] * (rank - 2)))

    def forward(self, u: Tensor, skip: Optional[Tensor] = None, overwrite: bool = False) -> Tensor:
        """u scaled channel-wise by its gate, ``u * s``; given the residual unit's ``skip``, ``skip + u * s``.

        The second form is the standard SE fused with its residual sum: one pass (``torch.addcmul``) instead of a
        multiply and then an add over the whole tensor. With ``overwrite`` (add_se sets it when u is a fresh layer
        output that nothing else in the block reads, or the block's own sum wrote into it, like torchvision's
        ``out += identity``) and autograd off, the result is written into u, which saves allocating a fresh tensor;
        a hook that keeps u (or the output of the layer that made it) must then clone it. With autograd on, u is
        kept for the gradient of s. In training, the standard SE (average squeeze) runs as one autograd Function
        whose backward reads g, u and s without autograd's expand and gradient sum (``fused_grad``).
        """
        if not torch.jit.is_scripting():  # TorchScript keeps the composed ops
            if fusable(self, u, skip):
                return fused_scale(self, u, skip)
        s = self.gate(u)
        if skip is None:
            return u * s
        if overwrite and not torch.is_grad_enabled():
            return torch.addcmul(skip, u, s, out=u)
        return torch.addcmul(skip, u, s)


_SIDES = {1: (9,), 2: (5, 7), 3: (3, 5, 7)}


def check_shape_kept(module: nn.Module, channels: int, like: torch.Tensor | None, dims: int = 2) -> str | None:
    """Why ``module`` is no SE layer for ``channels`` channels, or None: it must map a channels-first tensor with
    ``dims`` dimensions after C (1: N x C x L, 2: N x C x H x W, 3: N x C x D x H x W) to the same shape."""
    param = next(module.parameters(), None)
    ref = like if like is not None else param
    sides = _SIDES.get(dims, (3,) * dims)
    x = torch.zeros(2, channels, *sides, device=getattr(ref, "device", None), dtype=getattr(ref, "dtype", None))
    described = " x ".join(str(n) for n in x.shape)
    was = module.training
    try:
        module.eval()
        with torch.no_grad():
            y = module(x)
    except Exception as err:  # any failure is the user's layer refusing this input
        return f"it fails on a {described} input ({err})"
    finally:
        module.train(was)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return f"it maps {described} to {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
    return None
