"""Architecture names as every command takes them: a torchvision ``get_model`` name, ``timm:NAME``, or a factory of
the user's own code, ``package.module:function``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from .errors import TrainError

__all__ = ["TIMM_PREFIX", "FACTORY", "split_arch", "is_factory", "import_factory", "call_factory"]

TIMM_PREFIX = "timm:"
"""An ``arch`` that starts with it names a timm model (``timm:legacy_seresnet50``)."""
FACTORY = "factory"
"""The source :func:`split_arch` gives any other ``module:attribute`` name: a callable of the user's own code."""

_SHAPE = ("write it as package.module:function (a dotted module path, a colon, a dotted attribute path), e.g. "
          "mypkg.models:small_resnet; for a file models.py, put its folder on PYTHONPATH and pass models:small_resnet")


def _dotted(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def split_arch(arch: str) -> tuple[str, str]:
    """``(source, name)`` of an architecture name: ``"timm:resnet50"`` -> ``("timm", "resnet50")``, ``"resnet50"``
    -> ``("torchvision", "resnet50")``, ``"mypkg.models:small_resnet"`` -> ``("factory",
    "mypkg.models:small_resnet")`` (the attribute may be dotted: ``mypkg.models:Net.build``).

    Raises:
        TrainError: a name with a colon that is no ``module:attribute``.
    """
    if arch.startswith(TIMM_PREFIX):
        return "timm", arch[len(TIMM_PREFIX):]
    if ":" not in arch:
        return "torchvision", arch
    module, _, attribute = arch.partition(":")
    if not (_dotted(module) and _dotted(attribute)) or module.endswith(".py"):  # a file name, not a module
        raise TrainError(f"arch {arch!r} is not a module:factory name: {_SHAPE}")
    return FACTORY, arch


def is_factory(arch: str) -> bool:
    """Whether ``arch`` names a factory of the user's code (``package.module:function``)."""
    return split_arch(arch)[0] == FACTORY


def import_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` (``package.module:function``) names: its module imported, its attribute looked up.

    Importing runs the module's code: call it only for a name the user gave.

    Raises:
        TrainError: a malformed name, a module that does not import, a missing attribute, or one that is not
            callable.
    """
    if split_arch(spec)[0] != FACTORY:
        raise TrainError(f"{spec!r} is not a module:factory name: {_SHAPE}")
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TrainError(
            f"cannot import {module_name} for the factory {spec} ({type(e).__name__}: {e}): put its folder on "
            "PYTHONPATH or pip install its package"
        ) from None
    except Exception as e:  # the module's own code failed: a SyntaxError, a NameError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TrainError(f"importing {module_name} for the factory {spec} failed ({type(e).__name__}: {first}): fix "
                         "that module (python -c 'import " + module_name + "' shows the traceback)") from None
    obj: Any = module
    for depth, part in enumerate(attribute.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = module_name if depth == 0 else f"{module_name}:{'.'.join(attribute.split('.')[:depth])}"
            names = _own_callables(module) if depth == 0 else []
            hint = f" (it defines {', '.join(names)})" if names else ""
            raise TrainError(
                f"{owner} has no attribute {part!r}{hint}: name a function or class that builds the model, "
                f"{module_name}:NAME"
            ) from None
    if not callable(obj):
        raise TrainError(f"{spec} is not callable (an object of type {type(obj).__name__}): name a function or class "
                         "that returns an nn.Module")
    return obj


def _own_callables(module: Any) -> list[str]:
    """The public functions and classes ``module`` defines itself (not those it imports), at most six."""
    names = [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
             and getattr(v, "__module__", None) == module.__name__]
    return names[:6]


def call_factory(spec: str, num_classes: int | None, kwargs: dict[str, Any]) -> Any:
    """``factory(num_classes=num_classes, **kwargs)`` for the factory ``spec`` names (``num_classes=None``: leave
    it out, the factory's default), checked to return an ``nn.Module``.

    A call that does not fit the factory's signature because of ``kwargs`` raises ``TypeError`` (``"... unexpected
    keyword argument 'x'"``), as torchvision's and timm's builders do, so callers word it as an ``--arch-kwargs``
    problem.

    Raises:
        TrainError: the factory cannot be imported or called (see :func:`import_factory`), does not take
            ``num_classes``, or returns something other than an ``nn.Module``.
        TypeError: ``kwargs`` do not fit its signature.
    """
    from torch import nn

    factory = import_factory(spec)
    given = {**({} if num_classes is None else {"num_classes": num_classes}), **kwargs}
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C extension: no signature to check, the call tells
        signature = None
    if signature is not None and num_classes is not None:
        try:
            signature.bind_partial(num_classes=num_classes)
        except TypeError as e:
            raise TrainError(_no_num_classes(spec, e)) from None
    if signature is not None:
        try:
            signature.bind(**given)
        except TypeError as e:
            if kwargs:
                raise TypeError(f"{spec}() {e}") from None
            raise TrainError(
                f"the factory {spec} cannot be called with num_classes alone ({e}): give its other parameters "
                "defaults, or pass them with --arch-kwargs"
            ) from None
    try:
        model = factory(**given)
    except TypeError as e:
        if signature is None and "num_classes" in str(e):
            raise TrainError(_no_num_classes(spec, e)) from None
        raise
    if not isinstance(model, nn.Module):
        raise TrainError(
            f"the factory {spec} returned a {type(model).__name__}, not an nn.Module: make it return the model itself"
        )
    return model


def _no_num_classes(spec: str, error: TypeError) -> str:
    return (f"the factory {spec} does not take num_classes ({error}): give it a num_classes keyword argument, "
            "e.g. def build(num_classes: int = 1000, ...), which sets its classifier's width")
