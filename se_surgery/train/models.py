"""Build a (SE-)model from a plain-data ``model_config``: the same call makes it for training and rebuilds it later.

A ``model_config`` is JSON-able and holds everything needed: ``arch`` (a ``torchvision.models.get_model`` name,
``timm:<name>`` or a factory of the user's code, ``package.module:function``), ``arch_kwargs``, ``surgery`` (see
:func:`surgery_dict`; ``None`` for the plain model), ``num_classes``, ``class_names``, and the data settings ``data``,
``input_size``, ``resize``, ``mean`` and (when the recipe divides by one) ``std`` that the evaluation transform
needs.

A factory is imported (its module's code runs) only when the caller names it: :func:`build_model` refuses a config
whose ``arch`` is a factory unless ``factory`` repeats it or ``trust`` is set, so a checkpoint from a stranger cannot
make se-surgery import and call code.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import torch
from torch import nn

from ..archs import FACTORY, TIMM_PREFIX, call_factory, split_arch
from ..errors import TrainError, UntrustedFactory
from ..surgery import SEConfig, add_se, se_blocks
from ..surgery.naming import owner_of

__all__ = ["TIMM_PREFIX", "split_arch", "accepted_kwargs", "add_configured_se", "build_model", "build_training_model",
           "check_factory", "make_model_config", "record_owners", "se_config_of", "surgery_dict"]

log = logging.getLogger(__name__)
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")
_SURGERY_PLACES = ("where", "owners")  # the keys of a model_config's surgery that say where, not what SE


def _base(arch: str, kwargs: dict[str, Any], num_classes: int, pretrained: bool) -> nn.Module:
    try:
        return _create(arch, kwargs, num_classes, pretrained)
    except TypeError as e:  # a keyword the builder does not take, or a value of the wrong type
        if not kwargs:
            raise
        raise TrainError(
            f"--arch-kwargs {json.dumps(kwargs)} do not fit {arch} ({e}): pass only keyword arguments its builder "
            "takes, or --arch-kwargs '{}'"
        ) from None


def accepted_kwargs(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The part of ``kwargs`` that the architecture ``arch`` takes, found by building it once (random weights).

    Raises:
        TrainError: unknown architecture or missing timm.
    """
    kept = dict(kwargs)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        while kept:
            try:
                _create(arch, kept, 10, pretrained=False)
                break
            except TypeError as e:
                unexpected = _UNEXPECTED.search(str(e))
                if unexpected is None or unexpected.group(1) not in kept:
                    return {}  # a rejected value rather than a name: none of them fits
                del kept[unexpected.group(1)]
    return kept


def _create(arch: str, kwargs: dict[str, Any], num_classes: int, pretrained: bool) -> nn.Module:
    source, name = split_arch(arch)
    if source == FACTORY:
        if pretrained:
            raise TrainError(
                f"--pretrained does not apply to the factory {arch}, which builds its own weights: drop --pretrained "
                "and pass --weights FILE to start from a weights file"
            )
        return call_factory(arch, num_classes, kwargs)
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise TrainError(f"arch {arch!r} needs timm: pip install timm, or pick a torchvision arch") from None
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        except RuntimeError as e:  # timm's "Unknown model"
            raise TrainError(f"{e}: pick a name from timm.list_models()") from None
    from torchvision.models import get_model, list_models

    if arch not in list_models():
        raise TrainError(f"unknown arch {arch!r}: pick a torchvision.models.list_models() name or timm:<name>")
    if not pretrained:
        return get_model(arch, num_classes=num_classes, **kwargs)
    model = get_model(arch, weights="DEFAULT", **kwargs)
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if heads and heads[-1][1].out_features != num_classes:  # new classifier for our classes
        name, old = heads[-1]
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.Linear(old.in_features, num_classes))
    return model


def check_factory(config: dict[str, Any], factory: str | None = None, trust: bool = False, *,
                  what: str = "this model_config") -> None:
    """Refuse to build ``config`` when its ``arch`` is a factory the caller did not name (``factory``) or ``trust``.

    ``what`` names the config's source in the message (a checkpoint's path).

    Raises:
        UntrustedFactory: (a ``CheckpointError``) the config names a factory that is neither ``factory`` nor trusted.
    """
    arch = config.get("arch")
    if not isinstance(arch, str) or trust or factory == arch or split_arch(arch)[0] != FACTORY:
        return
    named = f" (not {factory})" if factory is not None and split_arch(factory)[0] == FACTORY else ""
    raise UntrustedFactory(
        f"{what} builds its model with the factory {arch}{named}, which se-surgery does not import on its own: pass "
        f"--arch {arch} (load_checkpoint(path, factory={arch!r})) if you trust it", arch
    )


def build_model(config: dict[str, Any], *, pretrained: bool = False, factory: str | None = None,
                trust: bool = False) -> nn.Module:
    """The model ``config`` describes (random weights unless ``pretrained``), SE blocks where it says.

    An ``arch`` that is a factory (``package.module:function``) is imported and called only when ``factory`` names
    the same one, or with ``trust``: a config read from a file never makes se-surgery import code on its own.

    Raises:
        UntrustedFactory: (a ``CheckpointError``) the config's factory was not named (``factory``) or trusted.
        TrainError: unknown architecture, missing timm, a factory that fails, or pretrained weights that cannot be
            fetched.
        SurgeryError: the surgery fails on this architecture.
    """
    check_factory(config, factory, trust)
    try:
        model = _base(config["arch"], dict(config.get("arch_kwargs") or {}), config["num_classes"], pretrained)
    except OSError as e:  # urllib's URLError included: no network
        if not pretrained:
            raise
        from torch.hub import get_dir

        raise TrainError(
            f"cannot fetch pretrained weights for {config['arch']} ({e}); offline, copy the weights file into "
            f"{get_dir()}/checkpoints, or drop --pretrained"
        ) from None
    return add_configured_se(model, config)


def add_configured_se(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """``model`` with the SE blocks ``config``'s ``surgery`` describes (in place); as it is when that is ``None``.

    Raises:
        SurgeryError: the surgery fails on this architecture.
    """
    surgery = config.get("surgery")
    if surgery:
        owners, where = surgery.get("owners"), surgery.get("where")
        wanted = set(owners).__contains__ if owners is not None else _where(where) if where else None
        size = config.get("input_size", 224)
        model = add_se(model, where=wanted, example_input=torch.zeros(2, 3, size, size), inplace=True,
                       **se_config_of(surgery).to_dict())
    return model


def _where(items: list) -> list:
    """``--where`` values: stage numbers as ints (``"4"`` -> 4), owner prefixes and paper names as they are."""
    return [int(w) if str(w).isdigit() else w for w in items]


def se_config_of(surgery: dict[str, Any]) -> SEConfig:
    """The SE a ``model_config``'s ``surgery`` describes, for every version's: an option it lacks has its default.

    Raises:
        SurgeryError: an option this version does not know, or a value it does not allow.
    """
    return SEConfig.from_dict({k: v for k, v in surgery.items() if k not in _SURGERY_PLACES})


def surgery_dict(config: SEConfig, where: list | None = None, owners: list[str] | None = None) -> dict[str, Any]:
    """A ``model_config``'s ``surgery``: ``reduction`` and ``init``, the options that differ from the paper's SE
    (:meth:`SEConfig.to_dict` ``changed_only``), ``where`` if given, and ``owners``, the exact owner names of the
    blocks that got an SE (``None``: every residual block).

    ``reduction`` and ``init`` are always there, as in the configs written before the other options existed, so the
    standard SE's config stays ``{"reduction": 16, "init": "he", "owners": [...]}`` and older runs still resume.
    """
    changed = config.to_dict(changed_only=True)
    return {"reduction": config.reduction, "init": config.init, **changed, **({"where": where} if where else {}),
            "owners": owners}


def make_model_config(recipe: Any, class_names: list[str], owners: list[str] | None = None) -> dict[str, Any]:
    """The ``model_config`` of a model trained with ``recipe`` (a resolved :class:`Recipe`) on ``class_names``.

    ``owners`` names the blocks that hold an SE; ``None`` means every residual block (what :func:`build_model` then
    gives), which :func:`build_training_model` replaces with the exact list once the surgery has run.
    """
    return {
        "arch": recipe.arch,
        "arch_kwargs": dict(recipe.arch_kwargs),
        "surgery": surgery_dict(recipe.se_config(), recipe.where, owners) if recipe.se else None,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "data": recipe.data,
        "input_size": recipe.input_size,
        "resize": recipe.resize,
        "mean": list(recipe.mean),
        **({"std": list(recipe.std)} if recipe.std is not None else {}),
    }


def build_training_model(recipe: Any, class_names: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh model for ``recipe`` and its ``model_config``, with the owners of the SE blocks the surgery added.

    Raises:
        TrainError: unknown architecture, missing timm, or pretrained weights that cannot be fetched.
        SurgeryError: the surgery fails on this architecture.
    """
    config = make_model_config(recipe, class_names)
    model = build_model(config, pretrained=recipe.pretrained, factory=recipe.arch)  # the user named recipe.arch
    record_owners(model, config)
    return model, config


def record_owners(model: nn.Module, config: dict[str, Any]) -> None:
    """Put the exact owners of ``model``'s SE blocks into ``config``'s ``surgery`` (if it has one)."""
    if config["surgery"] is not None:
        config["surgery"]["owners"] = list(dict.fromkeys(owner_of(name)[0] for name in se_blocks(model)))
