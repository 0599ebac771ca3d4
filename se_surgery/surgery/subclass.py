"""A block given an SE stays an instance of its own class: it gets a subclass whose ``forward`` is the fx-generated
code.

torch.fx's ``GraphModule`` replaces a module by a new object of a new class; here only the block's class changes
(``block.__class__ = subclass``), so the block keeps its identity, children, hooks, flags and every method of its
class, which act on its live submodules. One subclass is made per (original class, generated code): it has the
original's name, module and qualified name, and a ``__reduce_ex__`` that rebuilds it from that pair, so pickling
(``torch.save``), ``copy.deepcopy``, ``torch.jit.script`` (the source is registered with ``linecache``, where
``inspect`` finds it) and ``torch.compile`` all work.
"""

from __future__ import annotations

import itertools
import linecache
import re
import types
from typing import Any

from torch import fx, nn

__all__ = ["install_forward", "restore", "original_class", "runs_generated_forward", "calls", "none_arguments"]

_CLASSES: dict[tuple, type] = {}
_FILES = itertools.count()


class _ModuleRef:
    """A module in the generated code's globals, pickled by name (module objects cannot be pickled)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self):
        return _ModuleRef, (self.name,)


def _portable(globals_: dict[str, Any]) -> dict[str, Any]:
    return {k: _ModuleRef(v.__name__) if isinstance(v, types.ModuleType) else v for k, v in globals_.items()}


def _resolved(globals_: dict[str, Any]) -> dict[str, Any]:
    import importlib

    return {k: importlib.import_module(v.name) if isinstance(v, _ModuleRef) else v for k, v in globals_.items()}


_ASSERT_NONE = re.compile(r"(_assert_is_none\w*) = torch\.fx\._symbolic_trace\._assert_is_none\((\w+), ('[^'\n]*')\);"
                          r"  \2 = \1 = None")


def scriptable(src: str) -> str:
    """fx's check that an argument fixed to None stays None, as a plain ``assert``, which TorchScript compiles (it
    cannot compile fx's ``_assert_is_none``, which timm's DLA blocks, traced with ``children=None``, hold)."""
    return _ASSERT_NONE.sub(r"assert \2 is None, \3", src)


def none_arguments(block: nn.Module) -> dict[str, None]:
    """The arguments ``block``'s generated forward asserts are None (see :func:`scriptable`): fx ``concrete_args``
    for tracing that forward again."""
    src = vars(type(block)).get("_se_surgery_source", "")
    return dict.fromkeys(re.findall(r"^    assert (\w+) is None, ", src, flags=re.MULTILINE))


def _compile_forward(src: str, globals_: dict[str, Any]):
    filename = f"<se_surgery generated forward {next(_FILES)}>"
    # mtime None: linecache.checkcache never drops it, so inspect.getsource (TorchScript, tracebacks) finds it.
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    namespace = dict(globals_)
    exec(compile(src, filename, "exec", dont_inherit=True), namespace)  # dont_inherit: keep real annotations
    forward = namespace["forward"]
    forward.__module__ = __name__  # TorchScript looks up a method's overloads by its module's name
    return forward


def _reduce_ex(self: nn.Module, protocol: int):
    cls = type(self)
    args = (cls._se_surgery_base, cls._se_surgery_source, _portable(cls._se_surgery_globals), cls._se_surgery_calls,
            cls._se_surgery_specs)
    return _rebuild, args, self.__getstate__()


def _rebuild(
    base: type, src: str, globals_: dict[str, Any], called: frozenset[str], specs: tuple | None = None
) -> nn.Module:
    cls = _class_for(base, src, _resolved(globals_), called, specs)
    return cls.__new__(cls)  # pickle / deepcopy then restore the state with nn.Module.__setstate__


def _class_for(
    base: type, src: str, globals_: dict[str, Any], called: frozenset[str], specs: tuple | None = None
) -> type:
    key = (base, src, tuple(sorted((k, id(v)) for k, v in globals_.items())), str(specs))
    cls = _CLASSES.get(key)
    if cls is None:
        cls = type(base.__name__, (base,), {
            "forward": _compile_forward(src, globals_),
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__reduce_ex__": _reduce_ex,
            "_se_surgery_base": base,
            "_se_surgery_source": src,
            "_se_surgery_globals": globals_,
            "_se_surgery_calls": called,
            "_se_surgery_specs": specs,
            # a trace with concrete arguments (DLA's shortcut=None, Twins' size tuple) flattens its inputs with these
            **({"_in_spec": specs[0], "_out_spec": specs[1]} if specs else {}),
        })
        _CLASSES[key] = cls
    return cls


def original_class(block: nn.Module) -> type:
    """The class ``block`` had before :func:`install_forward` gave it a subclass."""
    return vars(type(block)).get("_se_surgery_base", type(block))


def runs_generated_forward(block: nn.Module) -> bool:
    """Whether ``block`` runs a forward made by :func:`install_forward`."""
    return "_se_surgery_base" in vars(type(block))


def calls(block: nn.Module) -> frozenset[str]:
    """Names of the submodules that ``block``'s generated forward calls (empty for a block that runs its own)."""
    return vars(type(block)).get("_se_surgery_calls", frozenset())


def install_forward(block: nn.Module, graph: fx.Graph) -> None:
    """Make ``block`` run ``graph`` (a trace of its own forward, edited), in place, keeping its class as a base."""
    code = graph.python_code("self")
    called = frozenset(n.target for n in graph.nodes if n.op == "call_module")
    info = getattr(graph._codegen, "pytree_info", None)
    specs = (info.in_spec, info.out_spec) if info is not None else None
    block.__class__ = _class_for(original_class(block), scriptable(code.src), code.globals, called, specs)


def restore(block: nn.Module) -> None:
    """Give ``block`` back its original class, and so its original forward."""
    block.__class__ = original_class(block)
