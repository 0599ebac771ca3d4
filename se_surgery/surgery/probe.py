"""One eager forward that finds which modules own a tensor sum in their own forward, and records their inputs.

Running the model once (instead of tracing all of it) means a module fx cannot trace only matters if it really
holds a sum, and every block's input is at hand for shape propagation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import SurgeryError
from ..modes import eval_mode
from .input_shape import example_call, input_channels

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


@dataclass
class Probe:
    """What one forward showed: owners of same-shape tensor sums (in call order) and each module's first inputs."""

    owners: list[str] = field(default_factory=list)
    inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)


class _SumSpy(TorchFunctionMode):
    def __init__(self, stack: list[str], probe: Probe) -> None:
        super().__init__()
        self.stack, self.probe = stack, probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADDS and self.stack and len(args) >= 1:
            a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() >= 3 and a.shape == b.shape:
                owner = self.stack[-1]
                if owner not in self.probe.owners:
                    self.probe.owners.append(owner)
        return func(*args, **kwargs)


def probe_sums(model: nn.Module, example_input: Tensor) -> Probe:
    """Run ``model(example_input)`` in eval mode under no_grad, watching for sums; the model's state is restored."""
    probe, stack, handles, convs = Probe(), [], [], []

    def pre_hook(name):
        def hook(module, args, kwargs):
            if not convs and isinstance(module, nn.Conv2d):
                convs.append(module.in_channels)  # the first convolution the input reaches
            stack.append(name)
            probe.inputs.setdefault(name, (args, kwargs))

        return hook

    def post_hook(module, args, output):
        stack.pop()

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook, always_call=True))
        with eval_mode(model), torch.no_grad(), _SumSpy(stack, probe):
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
