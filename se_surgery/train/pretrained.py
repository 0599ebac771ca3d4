"""A run that starts from a weights file (``--weights FILE``): which weights load when, a new head, what trains.

Plain weights load into the base model before ``add_se``; SE weights (an SE model's own state_dict) load after it.
Which one a file holds is read from its keys (:func:`~se_surgery.train.weights.holds_se`). The classifier is loaded
too unless the data's class count differs from the file's, or ``--new-head`` asks for a fresh one; then it keeps
its random init and trains with the SE blocks as a *new* parameter (:mod:`se_surgery.train.schedule`). With
``--gate-start S`` the identity-initialised gates start at S rather than 1, where they can learn
(:mod:`se_surgery.surgery.gate_start`).
``--freeze-backbone`` leaves out of the optimizer every parameter but the SE blocks' and the classifier's, and keeps
the BatchNorm layers among the frozen ones in eval mode, so their running statistics stay as loaded.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..surgery import se_blocks
from ..surgery.gate_start import start_gates
from .models import add_configured_se, build_model, make_model_config, record_owners
from .weights import fit_prefix, holds_se, load_weights, read_weights

__all__ = ["classifier_name", "model_from_weights", "pretrained_groups", "run_groups", "freeze_norms",
           "start_open_gates"]

log = logging.getLogger(__name__)


def classifier_name(model: nn.Module, num_classes: int) -> str | None:
    """The module name of ``model``'s classifier: timm's ``get_classifier()``, else the last linear (or 1x1 conv, as
    SqueezeNet's) layer with ``num_classes`` outputs; ``None`` if there is none."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        found = next((name for name, m in model.named_modules() if m is head and name), None)
        if found is not None:
            return found
    last = None
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and weight is not None and weight.shape[0] == num_classes:
            last = name
    return last


def _names_under(model: nn.Module, prefixes: list[str]) -> list[str]:
    return [name for name, _ in model.named_parameters() if any(name.startswith(p + ".") for p in prefixes)]


def model_from_weights(recipe: Any, class_names: list[str]) -> tuple[nn.Module, dict[str, Any], dict[str, list[str]]]:
    """The model of ``recipe`` started from ``recipe.weights``, its ``model_config`` and its parameter groups.

    Returns:
        ``(model, model_config, groups)``: ``groups`` holds ``new`` (the parameter names at ``--se-lr``: the SE blocks
        added here and a new head) and ``frozen`` (left out of the optimizer: ``--freeze-backbone``).

    Raises:
        CheckpointError: the file cannot be read, holds no weights, or its keys do not fit (named in one line).
        TrainError, SurgeryError: as :func:`~se_surgery.train.models.build_training_model`.
    """
    config = make_model_config(recipe, class_names)
    model = build_model({**config, "surgery": None}, factory=recipe.arch)  # the user named recipe.arch
    state = read_weights(recipe.weights, ema=recipe.ema)
    se_file = holds_se(state, model)
    if se_file:
        model = add_configured_se(model, config)
    state = fit_prefix(state, model.state_dict().keys())
    head = classifier_name(model, len(class_names))
    own = model.state_dict()
    head_keys = [k for k in own if head is not None and k.startswith(head + ".")]
    new_head = bool(head_keys) and (recipe.new_head or any(k not in state or state[k].shape != own[k].shape
                                                           for k in head_keys))
    if new_head:
        reason = "--new-head" if recipe.new_head else "the file's classifier does not fit"
        log.info("new head: %s starts from random weights for the %d classes (%s)", head, len(class_names), reason)
    load_weights(model, state, source=recipe.weights, skip=head_keys if new_head else ())
    if not se_file:
        model = add_configured_se(model, config)
        start_open_gates(model, recipe)
    record_owners(model, config)
    log.info("weights: %s (%s weights%s)", recipe.weights, "SE" if se_file else "plain",
             ", EMA" if recipe.ema else "")
    se_names = [] if se_file else _names_under(model, list(se_blocks(model)))
    new = se_names + (_names_under(model, [head]) if new_head else [])
    return model, config, run_groups(model, recipe, new=new, head=head)


def start_open_gates(model: nn.Module, recipe: Any) -> list[str]:
    """``--gate-start S`` (with identity init, on pretrained weights just loaded): the gates fed by a BatchNorm start
    at S, that BatchNorm divided by S (:func:`~se_surgery.surgery.gate_start.start_gates`); the blocks it moved."""
    if not (recipe.se and recipe.se_init == "identity" and recipe.gate_start < 1):
        return []
    size = recipe.input_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # the global RNG untouched
    started = start_gates(model, recipe.gate_start, example)
    if not started and se_blocks(model):
        log.warning("note: --gate-start %g moved no gate: no SE block of this network is fed by a BatchNorm (through "
                    "ReLUs or pooling only), so every gate starts at s = 1, where the sigmoid's slope is 5e-5 and it "
                    "hardly learns; --se-init he lets the gates learn but starts from other outputs", recipe.gate_start)
    return started


def run_groups(model: nn.Module, recipe: Any, *, new: list[str] | None = None,
               head: str | None = None) -> dict[str, list[str]] | None:
    """The parameter groups of a run: ``new`` as given (by default the SE blocks' parameters when ``--se-lr`` is
    set), ``frozen`` everything but ``new``, the SE blocks and the classifier ``head`` under ``--freeze-backbone``
    (which the recipe allows only with pretrained weights, whose callers name the head); ``None`` (one group, as runs
    from scratch have) when neither applies."""
    se = _names_under(model, list(se_blocks(model)))
    if new is None and recipe.se_lr is None and not recipe.freeze_backbone:
        return None
    new = se if new is None else new
    frozen: list[str] = []
    if recipe.freeze_backbone:
        kept = set(new) | set(se) | set(_names_under(model, [head] if head else []))
        frozen = [name for name, _ in model.named_parameters() if name not in kept]
    return {"new": new, "frozen": frozen}


def pretrained_groups(model: nn.Module, recipe: Any, num_classes: int) -> dict[str, list[str]]:
    """The parameter groups of a ``--pretrained`` run: the SE blocks and, when the data's class count differs from
    the downloaded weights' (the builder then gave it a new, random classifier), the head are new."""
    head = _pretrained_head(model, recipe, num_classes)
    return run_groups(model, recipe, new=_names_under(model, list(se_blocks(model))) + head,
                      head=classifier_name(model, num_classes))


def _pretrained_head(model: nn.Module, recipe: Any, num_classes: int) -> list[str]:
    from ..archs import split_arch

    source, name = split_arch(recipe.arch)
    try:
        if source == "timm":
            import timm

            classes = timm.models.get_pretrained_cfg(name).num_classes
        else:
            from torchvision.models import get_model_weights

            classes = len(get_model_weights(name).DEFAULT.meta["categories"])
    except Exception:  # no metadata to go by: ImageNet's 1000
        classes = 1000
    head = classifier_name(model, num_classes)
    return _names_under(model, [head]) if head and classes != num_classes else []


def freeze_norms(model: nn.Module) -> None:
    """Put the BatchNorm layers whose parameters are all frozen (or that have none) into eval mode: their running
    statistics stay as loaded."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()
