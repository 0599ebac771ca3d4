"""se-surgery: turn any CNN into its Squeeze-and-Excitation version (Hu et al., SENet) with torch.fx.

Examples:
    >>> import torchvision, se_surgery
    >>> model = se_surgery.add_se(torchvision.models.resnet50())
    >>> se_surgery.paper_names(model)["layer4.1.se"]
    'SE_5_2'
"""

from .checkpoint import CheckpointError, load_checkpoint
from .cost import summary
from .errors import SurgeryError
from .sampling import ClassAwareSampler
from .surgery import add_se, paper_names, remove_se, se_blocks

__all__ = [
    "add_se",
    "remove_se",
    "se_blocks",
    "paper_names",
    "summary",
    "ClassAwareSampler",
    "load_checkpoint",
    "SurgeryError",
    "CheckpointError",
]
__version__ = "0.1.0"
