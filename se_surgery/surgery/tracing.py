"""Tracer set-up for the surgery: shallow per-module tracing, and fx errors turned into actionable ones."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SurgeryError
from ..modes import eval_mode

__all__ = ["trace_module", "propagate_shapes"]

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


def trace_module(
    module: nn.Module, name: str, *, autowrap_functions: Sequence[Callable[..., Any]] = ()
) -> fx.Graph:
    """Symbolically trace ``module``'s own forward (children as leaves).

    Raises:
        SurgeryError: fx cannot trace it (data-dependent control flow, iterating a tensor, ...); the message names
            the module and the two ways out.
    """
    tracer = _ShallowTracer(autowrap_functions=tuple(autowrap_functions))
    try:
        graph = tracer.trace(module)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError, ... depending on the construct
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SurgeryError(
            f"torch.fx cannot trace the forward of {_display(name)} ({type(module).__name__}), which holds a residual "
            f"sum: {reason}. Either leave this block without SE with add_se(..., leaf_modules=[{name!r}]) or "
            f"leaf_modules=[{type(module).__name__}], or, if a helper function is the problem, keep it opaque with "
            f"autowrap_functions=[that_function]."
        ) from err
    _refuse_mode_dependent(module, name, graph, autowrap_functions)
    return graph


def _refuse_mode_dependent(
    module: nn.Module, name: str, graph: fx.Graph, autowrap_functions: Sequence[Callable[..., Any]]
) -> None:
    """fx fixes ``self.training`` at trace time: refuse a block whose own forward depends on it."""
    try:
        if "training" not in inspect.getsource(type(module).forward):
            return
    except (OSError, TypeError):  # no source at hand: compare the two traces anyway
        pass
    module.training = not module.training  # the owner's own flag only: children are leaves of this trace
    try:
        other = _ShallowTracer(autowrap_functions=tuple(autowrap_functions)).trace(module)
    finally:
        module.training = not module.training
    if other.python_code("self").src != graph.python_code("self").src:
        raise SurgeryError(
            f"the forward of {_display(name)} ({type(module).__name__}) branches on self.training, which torch.fx "
            "would freeze at trace time (the block would act the same in train and eval mode). Move that logic "
            f"into a submodule (e.g. nn.Dropout instead of F.dropout(..., self.training)), or leave the block "
            f"without SE with leaf_modules=[{name!r}]."
        )


def _positional_inputs(module: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict) -> list[Any]:
    """Order recorded call arguments like the graph's placeholders (a forward may be called with keywords)."""
    if not kwargs:
        return list(args)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    placeholders = [n.target for n in graph.nodes if n.op == "placeholder"]
    return [bound.arguments[p.lstrip("*")] for p in placeholders]


def propagate_shapes(module: nn.Module, graph: fx.Graph, name: str, args: tuple, kwargs: dict) -> None:
    """Annotate every node of ``graph`` with ``meta["tensor_meta"]`` by running it on recorded inputs (ShapeProp)."""
    gm = fx.GraphModule(module, graph)
    try:
        with eval_mode(gm), torch.no_grad():  # BatchNorm must not update its running statistics here
            ShapeProp(gm).propagate(*_positional_inputs(module, graph, args, kwargs))
    except Exception as err:
        raise SurgeryError(
            f"the traced forward of {_display(name)} ({type(module).__name__}) does not run on the inputs it received "
            f"({err}). Pass leaf_modules=[{name!r}] to leave it as it is."
        ) from err
