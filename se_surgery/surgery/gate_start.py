"""Identity-initialised SE blocks that can still learn: gates start at s0 < 1, the BatchNorm feeding each SE grows by
1 / s0, so the network computes what it did before the surgery.

``init="identity"`` opens every gate: fc2 = 0 and a bias that gives s = 1 to within 5e-5. That keeps a pretrained
network's outputs, but there the sigmoid's slope s (1 - s) is 5e-5, so the gradient reaching the excitation is 5e-5 of
what it is at s = 0.5 and the gates hardly move in a fine-tuning run. :func:`start_gates` moves each such gate to
s0 (0.5: the steepest point) and divides the affine parameters of the BatchNorm whose output the SE scales by s0
(through a ReLU, which commutes with a positive factor): ``s0 * (BN(x) / s0) = BN(x)``, in training and in eval mode.
A block fed by anything else (a convolution, a sum, a SiLU) keeps s = 1. One forward before and after checks that the
outputs are unchanged; if they are not, every change is undone.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..modes import eval_mode
from .remove import se_blocks
from .se_module import SELayer

__all__ = ["start_gates"]

log = logging.getLogger(__name__)
_PASS_THROUGH = (nn.ReLU, nn.Identity, nn.Dropout)  # f(x / s0) = f(x) / s0 for s0 > 0


def _bias_for(excitation: str, s0: float) -> float:
    """The fc2 bias whose gate is s0 when fc2's weights are 0."""
    if excitation == "sigmoid":
        return math.log(s0 / (1 - s0)) if s0 < 1 else 10.0
    if excitation == "tanh":
        return math.atanh(s0) if s0 < 1 else 10.0
    return s0 if s0 < 1 else 1 / 3  # relu: s = fc2's bias (x 3: exactly 1 for the reference)


def _producers(model: nn.Module, blocks: dict[str, nn.Module], example: Any) -> tuple[dict[str, list], Any]:
    """For each SE block, the BatchNorm (or ``None``) whose output reached it in each call; and the model's output."""
    made: dict[int, tuple[nn.Module, Tensor]] = {}  # id(tensor) -> (the BatchNorm it came from, the tensor: kept alive)
    seen: dict[str, list] = {name: [] for name in blocks}

    def norm_out(module, inputs, out):
        if isinstance(out, Tensor):
            made[id(out)] = (module, out)

    def pass_out(module, inputs, out):
        source = made.get(id(inputs[0])) if inputs and isinstance(inputs[0], Tensor) else None
        if source is not None and isinstance(out, Tensor):
            made[id(out)] = (source[0], out)

    def se_in(name):
        def hook(module, inputs):
            source = made.get(id(inputs[0])) if inputs and isinstance(inputs[0], Tensor) else None
            seen[name].append(source[0] if source is not None else None)
        return hook

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            handles.append(module.register_forward_hook(norm_out))
        elif isinstance(module, _PASS_THROUGH):
            handles.append(module.register_forward_hook(pass_out))
    handles += [block.register_forward_pre_hook(se_in(name)) for name, block in blocks.items()]
    try:
        out = model(example)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and bool(
            torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(float(a.abs().max()), 1.0)))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@torch.no_grad()
def start_gates(model: nn.Module, s0: float, example_input: Any) -> list[str]:
    """Start the identity-initialised SE blocks of ``model`` at gate s0, keeping its outputs (see the module doc).

    Args:
        model: A network after ``add_se(..., init="identity")`` and after its pretrained weights are loaded.
        s0: The gate every such block starts at, in (0, 1]; 1 changes nothing.
        example_input: One input the model takes (a small random batch).

    Returns:
        The SE blocks whose gates now start at s0 (the others keep s = 1).
    """
    if not 0 < s0 <= 1:
        raise ValueError(f"s0 {s0} must be in (0, 1]")
    blocks = {name: b for name, b in se_blocks(model).items() if isinstance(b, SELayer) and b.fc2.bias is not None
              and not b.fc2.weight.any()}  # still as identity init left them
    if s0 == 1 or not blocks:
        return []
    opened = {name: b.fc2.bias.clone() for name, b in blocks.items()}
    with eval_mode(model):
        for b in blocks.values():  # the reference: gates at 1 to within 1e-13, the network before the surgery
            b.fc2.bias.fill_(_bias_for(b.excitation, 1.0) * 3)
        seen, before = _producers(model, blocks, example_input)
        for name, b in blocks.items():
            b.fc2.bias.copy_(opened[name])
        feeds: dict[nn.Module, list[str]] = {}
        for name, sources in seen.items():
            if sources and sources[0] is not None and all(s is sources[0] for s in sources):
                feeds.setdefault(sources[0], []).append(name)
        pairs = [(norm, names[0]) for norm, names in feeds.items() if len(names) == 1]  # one BN, one SE
        if not pairs:
            return []
        kept = [(norm, norm.weight.clone(), norm.bias.clone(), blocks[name].fc2.bias.clone()) for norm, name in pairs]
        for norm, name in pairs:
            norm.weight.div_(s0)
            norm.bias.div_(s0)
            blocks[name].fc2.bias.fill_(_bias_for(blocks[name].excitation, s0))
        if not _same(before, model(example_input)):
            for (norm, weight, bias, fc2_bias), (_, name) in zip(kept, pairs):
                norm.weight.copy_(weight)
                norm.bias.copy_(bias)
                blocks[name].fc2.bias.copy_(fc2_bias)
            log.warning("start_gates: rescaling the BatchNorms before %d SE blocks changed the outputs; undone, the "
                        "gates start at s = 1", len(pairs))
            return []
    started = [name for _, name in pairs]
    log.info("gates of %d of %d identity-initialised SE blocks start at s = %g (the BatchNorm before each divided by "
             "it); %d keep s = 1", len(started), len(blocks), s0, len(blocks) - len(started))
    return started
