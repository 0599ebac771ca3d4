"""se-surgery: turn any CNN into its Squeeze-and-Excitation version (Hu et al., SENet) with torch.fx.

The surgery is imported eagerly; the training names (:func:`load_checkpoint`, :class:`ClassAwareSampler`) resolve on
first use (PEP 562), so ``import se_surgery`` and :func:`add_se` never load the trainer's data and sampling stack.

Examples:
    >>> import torchvision, se_surgery
    >>> model = se_surgery.add_se(torchvision.models.resnet50())
    >>> se_surgery.paper_names(model)["layer4.1.se"]
    'SE_5_2'
"""

from importlib import import_module
from typing import Any

from .errors import CheckpointError, DataError, SurgeryError, TrainError
from .surgery import (
    Plan,
    SEConfig,
    add_se,
    apply_plan,
    paper_names,
    plan,
    register_layer_type,
    remove_se,
    se_blocks,
    summary,
)

__all__ = [
    "add_se",
    "plan",
    "apply_plan",
    "Plan",
    "register_layer_type",
    "remove_se",
    "se_blocks",
    "paper_names",
    "summary",
    "SEConfig",
    "ClassAwareSampler",
    "load_checkpoint",
    "SurgeryError",
    "TrainError",
    "DataError",
    "CheckpointError",
]
__version__ = "0.1.0"

_LAZY = {"ClassAwareSampler": ".train.sampling", "load_checkpoint": ".train.checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
