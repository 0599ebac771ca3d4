"""The standard SE's training forward and backward as one autograd Function: ``skip + u * s`` (or ``u * s``) with
s the gate of u's average, and a backward with as few full-size passes as the math allows.

Autograd on the composed ops spends five full-size operations in backward: ``g * s``, ``g * u`` and its sum, the
average's expand of grad_z / HW (a full-size division), and the sum of u's two gradients. This Function computes

- ``grad_s = sum_hw(g * u)``;
- ``grad_u = g * s + grad_z / HW`` with grad_z broadcast, never expanded: one ``addcmul`` where u is channels-last,
  a multiply and an in-place add where it is channels-first (CPU's addcmul is slower there when an operand
  broadcasts along the contiguous dimensions);

and passes g on as the skip's gradient unchanged. The excitation (N x C tensors) is differentiated by hand, so the
backward calls no module and hooks fire only in the forward. A forward hook on ``scale_activation`` that returns a
replacement s would scale u by it while the gradient took it for the excitation's output, so the composed ops run
whenever such a hook is registered (and under ``torch.func`` transforms, forward-mode AD and ``torch.compile``).
The Function's backward is not itself differentiable: ``create_graph`` raises, naming ``fused_backward(False)``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD
from torch.nn.modules import module as module_hooks

__all__ = ["fused_backward", "fused_backward_enabled", "fusable", "fused_scale"]

_enabled = True


def fused_backward_enabled() -> bool:
    """Whether SELayer trains through the fused Function (the default) rather than autograd on the composed ops."""
    return _enabled


@contextmanager
def fused_backward(enabled: bool) -> Iterator[None]:
    """Within the block, SE layers train through the fused Function (``enabled``) or through autograd on the
    composed ops (the reference the Function is checked against); the previous choice is restored on exit."""
    global _enabled
    was, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = was


def _grad_sigmoid(grad: Tensor, s: Tensor) -> Tensor:
    return grad * (1 - s) * s  # autograd's order of operations


def _grad_tanh(grad: Tensor, s: Tensor) -> Tensor:
    return grad * (1 - s * s)


def _grad_relu(grad: Tensor, s: Tensor) -> Tensor:
    return grad.masked_fill(s <= 0, 0)  # as autograd's threshold_backward: a 0 where s is 0, even for a NaN grad


# The excitation's derivative from its output s. Exact types: a subclass may compute something else.
_GRADS = {nn.Sigmoid: _grad_sigmoid, nn.Tanh: _grad_tanh, nn.ReLU: _grad_relu}


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook or pre-hook (of these modules, or a global one) would see or change their output."""
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def fusable(layer: nn.Module, u: Tensor, skip: Optional[Tensor]) -> bool:
    """Whether ``layer(u, skip)`` (an ``SELayer``, which imports this module) can train through the fused
    Function: autograd records (something requires a gradient), the squeeze is the average, fc1's activation is a
    ReLU and the gate's a sigmoid, tanh or ReLU, the skip (if any) has u's shape and dtype. The composed ops run
    instead under a ``torch.compile`` trace (inductor fuses them itself), under ``torch.func`` transforms and
    within a forward-mode AD level (the Function has no vmap or jvp rule), and while a hook watches the
    excitation's modules: a hook that keeps s, builds a loss on it or returns a replacement gets autograd's
    gradients through it."""
    if not (_enabled and torch.is_grad_enabled() and layer.squeeze == "avg" and u.dim() >= 3):
        return False
    if type(layer.activation) is not nn.ReLU or type(layer.scale_activation) not in _GRADS:
        return False
    if skip is not None and (skip.shape != u.shape or skip.dtype != u.dtype):
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0:
        return False
    if _hooked(layer.activation, layer.scale_activation):
        return False
    return (u.requires_grad or (skip is not None and skip.requires_grad)
            or any(p.requires_grad for p in (layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias)
                   if p is not None))


def fused_scale(layer: nn.Module, u: Tensor, skip: Optional[Tensor]) -> Tensor:
    """``skip + u * s`` (``u * s`` without a skip), s = ``layer``'s gate of u, through the fused Function; the
    caller checks ``fusable`` first."""
    return _FusedSE.apply(u, skip, layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias, layer)


def _spatial_sum(x: Tensor) -> Tensor:
    """x summed over every dimension after C: N x C."""
    return x.sum(list(range(2, x.dim())))


class _FusedSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, skip, w1, b1, w2, b2, layer):  # type: ignore[override]
        z = layer._squeezed(u)
        hidden, s = layer._excite(z, u.dim())  # no hook watches these modules here: fusable checked
        out = u * s if skip is None else torch.addcmul(skip, u, s)
        ctx.save_for_backward(u, s, z, hidden, w1, w2)
        ctx.grad_excitation = _GRADS[type(layer.scale_activation)]
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        if torch.is_grad_enabled():  # backward(create_graph=True): these formulas are not recorded
            raise RuntimeError(
                "the fused SE's backward cannot be differentiated again (create_graph=True): run the forward and "
                "backward within se_surgery.surgery.fused_backward(False), which uses autograd's backward"
            )
        u, s, z, hidden, w1, w2 = ctx.saved_tensors
        need_u, need_skip, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        grads: list[Optional[Tensor]] = [None] * 7
        if need_skip:
            grads[1] = g
        if not (need_u or need_w1 or need_b1 or need_w2 or need_b2):
            return tuple(grads)
        n, c = u.shape[:2]
        small = s.dtype  # the excitation's dtype (autocast's, when it ran under autocast)
        product = g * u  # full-size, read once by the sum; then its memory takes grad_u (one allocation, not two)
        grad_logits = ctx.grad_excitation(_spatial_sum(product).to(small), s.view(n, c))
        if need_w2:
            grads[4] = grad_logits.t().mm(hidden.to(small)).to(w2.dtype).view_as(w2)
        if need_b2:
            grads[5] = grad_logits.sum(0).to(w2.dtype)
        if need_u or need_w1 or need_b1:
            grad_pre = grad_logits.mm(w2.flatten(1).to(small)).masked_fill(hidden <= 0, 0)
            if need_w1:
                grads[2] = grad_pre.t().mm(z.to(small)).to(w1.dtype).view_as(w1)
            if need_b1:
                grads[3] = grad_pre.sum(0).to(w1.dtype)
            if need_u:
                out = torch.result_type(g, s)
                spread = (grad_pre.mm(w1.flatten(1).to(small)) / math.prod(u.shape[2:])).to(out)
                spread = spread.view(list(s.shape))
                reuse = {"out": product} if product.dtype == out and product.stride() == g.stride() else {}
                if g.stride(1) == 1 and c > 1:  # channels-last: addcmul is one fast pass
                    grad_u = torch.addcmul(spread, g, s.to(out), **reuse)
                else:  # channels-first: CPU's addcmul broadcasting over the last dims is slower than two passes
                    grad_u = torch.mul(g, s.to(out), **reuse).add_(spread)
                grads[0] = grad_u.to(u.dtype)
        return tuple(grads)
