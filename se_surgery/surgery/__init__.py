"""The surgery: find every residual unit of a CNN with torch.fx and put an SE block on it, as plan then apply.

- :mod:`.planning`: :func:`plan` works out what :func:`add_se` would do, without touching the model: probe -> trace ->
  classify -> name -> select, returned as a printable :class:`Plan`;
- :mod:`.insert`: :func:`add_se` (plan, then :func:`apply_plan`) builds the SE blocks and inserts them;
- :mod:`.remove`: :func:`remove_se`, :func:`se_blocks`, :func:`paper_names`;
- :mod:`.config`: :class:`SEConfig`, the SE options as one frozen, validated dataclass;
- :mod:`.probe`, :mod:`.tracing`: one eager forward finds the owners of same-shape sums; each is traced alone;
- :mod:`.residual`: the rule that tells a residual branch from its skip; :mod:`.skips`: why a sum gets no SE;
- :mod:`.positions`: where the SE goes for each of the paper's positions (standard, PRE, POST, Identity, 3x3);
- :mod:`.layer_types`: the registry of layer types known by name (gates, norms, activations, pass-through);
- :mod:`.subclass`: an owner keeps its class (a subclass that runs the generated forward);
- :mod:`.se_module`: :class:`SELayer`, the SE block with the squeeze / excitation / bias variants;
- :mod:`.naming`: SE module names and the paper's ``SE_<stage>_<block>`` names; :mod:`.cost`: parameters and
  multiply-adds against the base model; :mod:`.inputs`, :mod:`.refusals`: argument checks and refusal texts.

Nothing here imports the trainer.
"""

from .config import SEConfig
from .cost import Summary, summary
from .fused_grad import fused_backward
from .insert import add_se, apply_plan
from .layer_types import LayerKind, register_layer_type
from .planning import Plan, Skip, Unit, UnitKind, plan
from .remove import paper_names, remove_se, se_blocks
from .se_module import SELayer
from .skips import SkipKind, Untraceable

__all__ = ["add_se", "plan", "apply_plan", "remove_se", "se_blocks", "paper_names", "summary", "Summary", "SELayer",
           "SEConfig", "Plan", "Unit", "UnitKind", "Skip", "SkipKind", "Untraceable", "register_layer_type",
           "LayerKind", "fused_backward"]
