"""The surgery: find every residual sum of a CNN with torch.fx and put an SE block on its branch.

The pass runs probe -> tracing -> residual rule -> rewrite, with naming (``SE_<stage>_<block>``) and costs beside it:

- :mod:`.probe`: one eager forward finds the modules whose own forward adds two same-shape tensors;
- :mod:`.tracing`: each such block is traced alone with fx (children stay leaves) and its shapes propagated;
- :mod:`.residual`: the rule that tells a residual branch from its skip on that graph;
- :mod:`.positions`: where the SE goes for each of the paper's positions (standard, PRE, POST, Identity, 3x3);
- :mod:`.rewrite`: :func:`add_se` / :func:`remove_se` put the SE blocks in and take them out;
- :mod:`.rewritten`: a rewritten block keeps its class (a subclass that runs the generated forward);
- :mod:`.se_module`: :class:`SELayer`, the SE block with the squeeze / excitation / bias variants;
- :mod:`.naming`: the paper's block names; :mod:`.cost`: parameters and multiply-adds against the base model.

Nothing here imports the trainer.
"""

from .config import SEConfig
from .cost import Summary, summary
from .rewrite import add_se, paper_names, remove_se, se_blocks
from .se_module import SELayer

__all__ = ["add_se", "remove_se", "se_blocks", "paper_names", "summary", "Summary", "SELayer", "SEConfig"]
