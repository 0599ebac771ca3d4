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
from .se_module import _IDENTITY_BIAS, SELayer

__all__ = ["start_gates"]

log = logging.getLogger(__name__)
# f(x / s0) = f(x) / s0 for s0 > 0: the modules a BatchNorm's output may pass on its way to the SE
_PASS_THROUGH = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_PLAIN_NORMS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}  # not timm's BatchNormAct2d


def _bias_for(excitation: str, s0: float) -> float:
    """The fc2 bias whose gate is s0 < 1 when fc2's weights are 0."""
    if excitation == "sigmoid":
        return math.log(s0 / (1 - s0))
    if excitation == "tanh":
        return math.atanh(s0)
    return s0  # relu: s is the bias itself


def _reference_bias(excitation: str) -> float:
    """A bias whose gate is 1 to float precision (identity init's is 1 only to within 5e-5)."""
    return 1.0 if excitation == "relu" else 30.0


def _is_open(block: SELayer) -> bool:
    """Whether ``block`` is as identity init left it: fc2 = 0 and the opening bias, not yet trained or started."""
    bias = _IDENTITY_BIAS.get(block.excitation)
    return bias is not None and not block.fc2.weight.any() and bool((block.fc2.bias == bias).all())


def _producers(model: nn.Module, blocks: dict[str, nn.Module], example: Any) -> tuple[dict[str, list], Any]:
    """For each SE block, the BatchNorm (or ``None``) whose output reached it unchanged but for pass-through modules,
    in each call; and the model's output. A tensor is followed by its id and its version: an in-place op that is no
    pass-through (a SiLU, the fused SE's ``addcmul``) changes its version and ends the trail."""
    made: dict[int, tuple[nn.Module, Tensor, int]] = {}  # id -> (the BatchNorm, the tensor (kept alive), its version)
    seen: dict[str, list] = {name: [] for name in blocks}
    pending: dict[int, nn.Module | None] = {}  # id(pass-through module) -> the source of the input it is running on

    def source_of(inputs: tuple) -> nn.Module | None:
        if not inputs or not isinstance(inputs[0], Tensor):
            return None
        entry = made.get(id(inputs[0]))
        return entry[0] if entry is not None and entry[2] == inputs[0]._version else None

    def norm_out(module, inputs, out):
        if isinstance(out, Tensor):
            made[id(out)] = (module, out, out._version)

    def pass_in(module, inputs):
        pending[id(module)] = source_of(inputs)  # before an in-place op changes the input's version

    def pass_out(module, inputs, out):
        source = pending.pop(id(module), None)
        if source is not None and isinstance(out, Tensor):
            made[id(out)] = (source, out, out._version)

    def se_in(name):
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model

        def hook(module, inputs):
            source = source_of(inputs)
            if source is None and isinstance(owner, _PASS_THROUGH) and id(owner) in pending:
                source = pending[id(owner)]  # a holder (a ReLU that runs the SE on its own output, add_se's plain rule)
            seen[name].append(source)
        return hook

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and type(module).forward in \
                _PLAIN_NORMS:
            handles.append(module.register_forward_hook(norm_out))
        elif isinstance(module, _PASS_THROUGH):
            handles += [module.register_forward_pre_hook(pass_in), module.register_forward_hook(pass_out)]
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
            torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(float(a.abs().max()), 1.0)))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


class _Pair:
    """A BatchNorm and the one SE block it feeds: the rescale to apply or undo."""

    def __init__(self, norm: nn.Module, name: str, block: SELayer, s0: float) -> None:
        self.norm, self.name, self.block, self.s0 = norm, name, block, s0
        self.kept = (norm.weight.clone(), norm.bias.clone())

    def apply(self) -> None:
        self.norm.weight.div_(self.s0)
        self.norm.bias.div_(self.s0)
        self.block.fc2.bias.fill_(_bias_for(self.block.excitation, self.s0))

    def undo(self) -> None:
        self.norm.weight.copy_(self.kept[0])
        self.norm.bias.copy_(self.kept[1])
        self.block.fc2.bias.fill_(_reference_bias(self.block.excitation))


@torch.no_grad()
def start_gates(model: nn.Module, s0: float, example_input: Any) -> list[str]:
    """Start the identity-initialised SE blocks of ``model`` at gate s0, keeping its outputs (see the module doc).

    Args:
        model: A network after ``add_se(..., init="identity")`` and after its pretrained weights are loaded.
        s0: The gate every such block starts at, in (0, 1]; 1 changes nothing.
        example_input: One input the model takes (a small random batch).

    Returns:
        The SE blocks whose gates now start at s0 (the others keep identity init's s = 1; so does every block when
        the model cannot run ``example_input``).
    """
    if not 0 < s0 <= 1:
        raise ValueError(f"s0 {s0} must be in (0, 1]")
    blocks = {name: b for name, b in se_blocks(model).items() if isinstance(b, SELayer) and b.fc2.bias is not None
              and _is_open(b)}
    if s0 == 1 or not blocks:
        return []
    opened = {name: b.fc2.bias.clone() for name, b in blocks.items()}
    pairs: list[_Pair] = []
    started: list[_Pair] = []
    try:
        with eval_mode(model):
            for b in blocks.values():  # the reference: every gate at 1 to float precision, the network before add_se
                b.fc2.bias.fill_(_reference_bias(b.excitation))
            seen, before = _producers(model, blocks, example_input)
            feeds: dict[nn.Module, list[str]] = {}
            for name, sources in seen.items():
                if sources and sources[0] is not None and all(s is sources[0] for s in sources):
                    feeds.setdefault(sources[0], []).append(name)
            pairs = [_Pair(norm, names[0], blocks[names[0]], s0) for norm, names in feeds.items() if len(names) == 1]
            for pair in pairs:
                pair.apply()
            if _same(before, model(example_input)):
                started = pairs
            else:  # one pair at a time: keep those that leave the outputs as they were
                for pair in pairs:
                    pair.undo()
                for pair in pairs:
                    pair.apply()
                    if _same(before, model(example_input)):
                        started.append(pair)
                    else:
                        pair.undo()
                log.warning("start_gates: rescaling the BatchNorm before %d of %d SE blocks changed the outputs (its "
                            "output has another use); those gates start at s = 1", len(pairs) - len(started),
                            len(pairs))
    except Exception as error:  # the model cannot run the example: change nothing
        for pair in pairs:
            pair.undo()
        started = []
        log.warning("start_gates: the model did not run the example input (%s: %s); every gate starts at s = 1",
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    finally:
        moved = {pair.name for pair in started}
        for name, b in blocks.items():
            if name not in moved:
                b.fc2.bias.copy_(opened[name])
    if len(started) < len(blocks):
        log.info("gates of %d of %d identity-initialised SE blocks start at s = %g (the BatchNorm before each divided "
                 "by it); %d keep s = 1 (fed by no BatchNorm)", len(started), len(blocks), s0,
                 len(blocks) - len(started))
    else:
        log.info("gates of all %d identity-initialised SE blocks start at s = %g (the BatchNorm before each divided "
                 "by it)", len(blocks), s0)
    return [pair.name for pair in started]
