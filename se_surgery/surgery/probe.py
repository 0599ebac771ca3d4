"""One eager forward that finds which modules own a tensor sum, a channel concatenation or a convolution in their own
forward, and records every module's inputs and how often it runs.

Running the model once (instead of tracing all of it) means a module fx cannot trace only matters if it really
holds a sum, and every block's input is at hand for shape propagation.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import SurgeryError
from ..modes import eval_mode
from .input_shape import example_call, input_channels
from .residual import CATS

__all__ = ["Probe", "probe_sums", "probe_first", "input_channels"]

logger = logging.getLogger(__name__)

_ADDS = {
    torch.add,
    Tensor.add,
    Tensor.add_,
    Tensor.__add__,
    Tensor.__iadd__,
    Tensor.__radd__,
}
_CONVS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


@dataclass
class Probe:
    """What one forward showed: owners of same-shape tensor sums (in call order) and each module's first inputs.

    ``cat_owners`` run a concatenation of channel-first maps along dim 1 (Inception, DenseNet), ``conv_owners`` call a
    convolution themselves (a plain chain's links), ``calls`` counts each module's calls.
    """

    owners: list[str] = field(default_factory=list)
    inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)
    cat_owners: list[str] = field(default_factory=list)
    conv_owners: list[str] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)


class _SumSpy(TorchFunctionMode):
    def __init__(self, stack: list[str], probe: Probe, convs: set[str], received: list[set[int]]) -> None:
        super().__init__()
        self.stack, self.probe, self.convs, self.received = stack, probe, convs, received

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADDS and self.stack and len(args) >= 1:
            a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() >= 3 and a.shape == b.shape:
                _note(self.probe.owners, self.stack[-1])
        elif func in CATS and self.stack and _channel_cat(args, kwargs, self.received[-1]):
            _note(self.probe.cat_owners, self.stack[-1])
        elif func in _CONVS and self.stack and self.stack[-1] not in self.convs:  # F.conv2d in a block's forward
            _note(self.probe.conv_owners, self.stack[-1])
        return func(*args, **kwargs)


def _note(owners: list[str], owner: str) -> None:
    if owner not in owners:
        owners.append(owner)


def _tensor_ids(args: tuple, kwargs: dict) -> set[int]:
    """The ids of the tensors a module received, in lists and tuples too (DenseNet layers take a list)."""
    found, todo = set(), [*args, *kwargs.values()]
    while todo:
        item = todo.pop()
        if isinstance(item, Tensor):
            found.add(id(item))
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return found


def _channel_cat(args: tuple, kwargs: dict, received: set[int]) -> bool:
    """Whether ``torch.cat(tensors, dim)`` joins two or more channel-first maps (rank >= 3) along dim 1, not all
    of them the module's own inputs (a DenseNet layer joining the features it was given makes no branches)."""
    tensors = args[0] if args else kwargs.get("tensors", ())
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not isinstance(dim, int):
        return False
    if all(id(t) in received for t in tensors):
        return False
    ranks = {t.dim() for t in tensors if isinstance(t, Tensor)}
    return len(ranks) == 1 and (rank := ranks.pop()) >= 3 and dim % rank == 1


def probe_sums(model: nn.Module, example_input: Tensor) -> Probe:
    """Run ``model(example_input)`` in eval mode under no_grad, watching for sums; the model's state is restored."""
    probe, stack, handles, convs, received = Probe(), [], [], [], []
    conv_modules = {name for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}

    def pre_hook(name):
        def hook(module, args, kwargs):
            if not convs and isinstance(module, nn.modules.conv._ConvNd):
                convs.append(module.in_channels)  # the first convolution the input reaches
            if name in conv_modules and stack:
                _note(probe.conv_owners, stack[-1])
            stack.append(name)
            received.append(_tensor_ids(args, kwargs))
            probe.calls[name] += 1
            probe.inputs.setdefault(name, (args, kwargs))

        return hook

    def post_hook(module, args, output):
        stack.pop()
        received.pop()

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook, always_call=True))
        with eval_mode(model), torch.no_grad(), _SumSpy(stack, probe, conv_modules, received):
            model(example_input)
    except Exception as err:
        given = example_input.shape[1] if example_input.dim() > 1 else 3
        channels = convs[0] if convs else input_channels(model) or given
        raise SurgeryError(
            f"{type(model).__name__} failed on the example input of shape {tuple(example_input.shape)}: "
            f"{str(err).rstrip('.')}. "
            f"Pass one it accepts: add_se(model, example_input={example_call(model, channels)})."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    return probe


def probe_first(model: nn.Module, candidates: Sequence[Tensor]) -> tuple[Probe, Tensor]:
    """:func:`probe_sums` with the first of ``candidates`` the model runs on, and that input; if none runs, the
    error of the first (its suggested input has the model's dimensionality)."""
    if not candidates:
        raise SurgeryError("probe_first needs at least one candidate input: pass e.g. default_examples(model)")
    first: SurgeryError | None = None
    for example in candidates:
        try:
            return probe_sums(model, example), example
        except SurgeryError as err:
            first = first or err
            logger.debug("probe at %s failed: %s", tuple(example.shape), err)
    raise first
