"""se-surgery: turn any CNN into its Squeeze-and-Excitation version (Hu et al., SENet) with torch.fx."""

from .errors import SurgeryError
from .cost import summary
from .surgery import add_se, paper_names, remove_se, se_blocks

__all__ = ["add_se", "remove_se", "se_blocks", "paper_names", "summary", "SurgeryError"]
__version__ = "0.1.0"
