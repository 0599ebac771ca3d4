"""Tracer set-up for the surgery: shallow per-module tracing, and fx errors turned into actionable ones."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import PH
from torch.fx.graph import _PyTreeCodeGen
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SurgeryError
from ..modes import eval_mode

__all__ = ["trace_module", "propagate_shapes", "concrete_arguments"]

logger = logging.getLogger(__name__)


class _ShallowTracer(fx.Tracer):
    """Traces one module's own ``forward``: every submodule call stays a single ``call_module`` node.

    Tracing a block alone (rather than the whole network) is what lets the outer model keep its class and methods,
    and confines fx's limits to the few modules that own a residual sum.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _display(name: str) -> str:
    return f"`{name}`" if name else "the top-level model"


def concrete_arguments(module: nn.Module, args: tuple, kwargs: dict, lists: bool = False) -> dict[str, Any]:
    """fx ``concrete_args`` for the forward arguments of a recorded call that fx cannot trace as one opaque value.

    - None (passed, or left at a None default) is fixed to None, so ``if shortcut is None: shortcut = x`` (timm's
      DLA blocks) takes the branch the model really takes; the traced forward asserts it stays None.
    - A tuple or list of ints (a feature-map size, Twins' ``PosConv.forward(x, size)``) is traced element by element,
      so ``view(B, C, *size)`` works and the block still runs at any size.
    - With ``lists``, a list of tensors (SelecSLS's and VoVNet's feature lists) is traced element by element at its
      length: the retry for a forward that fx cannot trace with the list as one value (``len(x)``, ``x[1] = ...``).
    """
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    bound.apply_defaults()
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = bound.signature.parameters
    concrete: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        if params[key].kind not in plain:
            continue
        if value is None:
            concrete[key] = None
        elif isinstance(value, (tuple, list)) and value and all(type(v) is int for v in value):
            concrete[key] = [PH] * len(value) if isinstance(value, list) else (PH,) * len(value)  # torch.Size too
        elif lists and isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            concrete[key] = [PH] * len(value)  # a list of feature maps (DenseNet, SelecSLS, VoVNet): its length fixed
    return concrete


def trace_module(
    module: nn.Module,
    name: str,
    *,
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.Graph:
    """Symbolically trace ``module``'s own forward (children as leaves).

    Args:
        concrete_args: forward arguments fixed at trace time (see :func:`none_arguments`).

    Raises:
        SurgeryError: fx cannot trace it (data-dependent control flow, iterating a tensor, ...); the message names
            the module and the two ways out.
    """
    tracer = _ShallowTracer(autowrap_functions=tuple(autowrap_functions))
    try:
        with _state_kept(module):
            graph = tracer.trace(module, concrete_args or None)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError, ... depending on the construct
        reason = _first_line(err)
        raise SurgeryError(
            f"torch.fx cannot trace the forward of {_display(name)} ({type(module).__name__}), which holds a place "
            f"for an SE: {reason}. Either leave this block without SE with add_se(..., leaf_modules=[{name!r}]) or "
            f"leaf_modules=[{type(module).__name__}], or, if a helper function is the problem, keep it opaque with "
            f"autowrap_functions=[that_function]."
        ) from err
    _refuse_mode_dependent(module, name, graph, autowrap_functions, concrete_args)
    if concrete_args and not any(isinstance(v, (list, tuple)) for v in concrete_args.values()):
        _keep_annotations(module, graph, concrete_args)  # (a flattened list would put the placeholders out of step)
    return graph


def _keep_annotations(module: nn.Module, graph: fx.Graph, concrete_args: dict[str, Any]) -> None:
    """Give an argument fixed to None its annotation back (fx drops it), so TorchScript reads ``children=None`` of
    type ``Optional[List[Tensor]]`` rather than a Tensor."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for param, node in zip(params, placeholders):
        fixed = concrete_args.get(param.name, PH)
        if fixed is None and node.type is None and param.annotation is not inspect.Parameter.empty:
            node.type = param.annotation


@contextlib.contextmanager
def _state_kept(module: nn.Module):
    """Give ``module`` its own attributes back after tracing it: a forward that caches what it computes
    (torchvision's ``AnchorGenerator.cell_anchors``) would otherwise keep fx proxies, and fail when run."""
    saved = {k: dict(v) if k in ("_parameters", "_buffers", "_modules") else v for k, v in vars(module).items()}
    try:
        yield
    finally:
        module.__dict__.clear()
        module.__dict__.update(saved)


def _first_line(err: Exception) -> str:
    """The gist of an fx error: its first line, without the node metadata ShapeProp appends."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(" with meta=")[0]


def _refuse_mode_dependent(
    module: nn.Module,
    name: str,
    graph: fx.Graph,
    autowrap_functions: Sequence[Callable[..., Any]],
    concrete_args: dict[str, Any] | None = None,
) -> None:
    """fx fixes ``self.training`` at trace time: refuse a block whose own forward depends on it."""
    try:
        if "training" not in inspect.getsource(type(module).forward):
            return
    except (OSError, TypeError):  # no source at hand: compare the two traces anyway
        pass
    module.training = not module.training  # the owner's own flag only: children are leaves of this trace
    try:
        with _state_kept(module):
            other = _ShallowTracer(autowrap_functions=tuple(autowrap_functions)).trace(module, concrete_args or None)
    except Exception:  # the other mode's forward does not even trace: it surely differs
        other = None
    finally:
        module.training = not module.training
    if other is None or other.python_code("self").src != graph.python_code("self").src:
        raise SurgeryError(
            f"the forward of {_display(name)} ({type(module).__name__}) branches on self.training, which torch.fx "
            "would freeze at trace time (the block would act the same in train and eval mode). Move that logic "
            f"into a submodule (e.g. nn.Dropout instead of F.dropout(..., self.training)), or leave the block "
            f"without SE with leaf_modules=[{name!r}]."
        )


def _positional_inputs(module: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict) -> list[Any]:
    """Order recorded call arguments like the graph's placeholders (a forward may be called with keywords).

    fx may rename a placeholder (``shortcut`` -> ``shortcut_1`` when it was fixed by ``concrete_args``), so a name
    that is not an argument is matched by its position in the signature instead.
    """
    placeholders = [n.target for n in graph.nodes if n.op == "placeholder"]
    if isinstance(graph._codegen, _PyTreeCodeGen):  # the traced forward flattens its own arguments
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())
    if not kwargs and len(args) >= len(placeholders):
        return list(args)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    values = list(bound.arguments.values())
    return [
        bound.arguments[p.lstrip("*")] if p.lstrip("*") in bound.arguments else values[i]
        for i, p in enumerate(placeholders)
    ]


def propagate_shapes(module: nn.Module, graph: fx.Graph, name: str, args: tuple, kwargs: dict) -> None:
    """Annotate every node of ``graph`` with ``meta["tensor_meta"]`` by running it on recorded inputs (ShapeProp).

    ShapeProp prints a traceback to stderr before it re-raises; that print is swallowed (the error carries it).
    """
    try:
        gm = fx.GraphModule(module, graph)
        # BatchNorm must not update its running statistics here
        with eval_mode(gm), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*_positional_inputs(module, graph, args, kwargs))
    except Exception as err:
        raise SurgeryError(
            f"the traced forward of {_display(name)} ({type(module).__name__}) does not run on the inputs it received "
            f"({_first_line(err)}). Pass leaf_modules=[{name!r}] to leave it as it is."
        ) from err
