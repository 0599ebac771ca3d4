"""Tracer set-up for the surgery: shallow per-module tracing, and fx errors turned into actionable ones."""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import SurgeryError

__all__ = ["trace_module", "propagate_shapes", "build_graph_module"]

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
        _warn_if_mode_dependent(module, name, graph, autowrap_functions)
        return graph
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError, ... depending on the construct
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SurgeryError(
            f"torch.fx cannot trace the forward of {_display(name)} ({type(module).__name__}), which holds a residual "
            f"sum: {reason}. Either leave this block without SE with add_se(..., leaf_modules=[{name!r}]) or "
            f"leaf_modules=[{type(module).__name__}], or, if a helper function is the problem, keep it opaque with "
            f"autowrap_functions=[that_function]."
        ) from err


def _warn_if_mode_dependent(
    module: nn.Module, name: str, graph: fx.Graph, autowrap_functions: Sequence[Callable[..., Any]]
) -> None:
    """fx fixes ``self.training`` at trace time; say so when the block's own forward reads it."""
    try:
        if "training" not in inspect.getsource(type(module).forward):
            return
    except (OSError, TypeError):  # no source at hand: compare the two traces anyway
        pass
    module.train(not module.training)
    try:
        other = _ShallowTracer(autowrap_functions=tuple(autowrap_functions)).trace(module)
    finally:
        module.train(not module.training)
    if other.python_code("self").src != graph.python_code("self").src:
        logger.warning(
            "the forward of %s reads self.training, which torch.fx fixes at trace time (training=%s): call "
            "add_se on the model in the mode you will use it in, or move that logic into a submodule.",
            _display(name),
            module.training,
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
    modes = {m: m.training for m in module.modules()}
    try:
        gm.eval()  # BatchNorm must not update its running statistics on the example input
        with torch.no_grad():
            ShapeProp(gm).propagate(*_positional_inputs(module, graph, args, kwargs))
    except Exception as err:
        raise SurgeryError(
            f"the traced forward of {_display(name)} ({type(module).__name__}) does not run on the inputs it received "
            f"({err}). Pass leaf_modules=[{name!r}] to leave it as it is."
        ) from err
    finally:
        for m, mode in modes.items():
            m.training = mode


def _reordered(new: "OrderedDict[str, Any]", reference: "OrderedDict[str, Any]") -> "OrderedDict[str, Any]":
    order = [k for k in reference if k in new] + [k for k in new if k not in reference]
    return OrderedDict((k, new[k]) for k in order)


def build_graph_module(owner: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running ``graph`` that keeps *all* of ``owner``'s state under the same keys, in the same order.

    ``fx.GraphModule`` copies only what the graph uses; children, parameters and buffers the forward never touches
    would silently vanish from the state_dict, so they are put back. Plain attributes (``stride``, flags) are
    carried over too, so code that reads them keeps working.
    """
    gm = fx.GraphModule(owner, graph, class_name=type(owner).__name__)
    for store in ("_modules", "_parameters", "_buffers"):
        ours, theirs = getattr(gm, store), getattr(owner, store)
        for key, value in theirs.items():
            if key not in ours:
                ours[key] = value
        setattr(gm, store, _reordered(ours, theirs))
    gm._non_persistent_buffers_set = set(owner._non_persistent_buffers_set)
    for key, value in vars(owner).items():
        if not key.startswith("_") and key != "training" and key not in vars(gm):
            if isinstance(value, (bool, int, float, str, tuple, type(None))):
                gm.__dict__[key] = value
    gm.train(owner.training)
    return gm
