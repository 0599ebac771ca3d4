"""The one-line texts for what the surgery leaves without an SE: skipped sums by reason, blocks fx cannot trace."""

from __future__ import annotations

from typing import Sequence

from ..errors import SurgeryError
from .skips import SkipKind, Skipped, Untraceable

__all__ = ["listed", "grouped", "found_instead", "no_unit"]

def listed(owners: list[str]) -> str:
    """The first four names, then how many more."""
    return ", ".join(owners[:4]) + (f" and {len(owners) - 4} more" if len(owners) > 4 else "")


_PLACES = {SkipKind.INNER_CONCAT: "concatenation(s)", SkipKind.NO_BRANCHES: "concatenation(s)",
           SkipKind.OUTSIDE_UNITS: "convolution(s)", SkipKind.CONTAINER: "layer(s)"}


def _places(skip: Skipped) -> str:
    """What a skipped place is, in words: a sum, a concatenation, a convolution or a layer."""
    if skip.kind in _PLACES:
        return _PLACES[skip.kind]
    node = skip.add
    target = getattr(node.target, "__name__", str(node.target))
    if target in ("cat", "concat", "concatenate"):
        return "concatenation(s)"
    fused = node.op == "call_module" and len(node.args) > 1  # an SE of ours running its sum
    return "sum(s)" if "add" in target or fused else "layer(s)"


def grouped(skipped: Sequence[tuple[str, Skipped]], untraced: Sequence[Untraceable] = ()) -> str:
    """One line for everything left without SE: sums by reason, then blocks fx could not trace or run, by class."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for owner, skip in skipped:
        by_reason.setdefault((_places(skip), skip.reason), []).append(owner or "<top>")
    by_class: dict[str, list[tuple[str, SurgeryError]]] = {}
    for u in untraced:
        by_class.setdefault(u.class_name, []).append((u.owner or "<top>", u.error))
    parts = [f"{len(owners)} {places} where {reason} ({listed(owners)})"
             for (places, reason), owners in by_reason.items()]
    for errors in by_class.values():
        first = str(errors[0][1]).rstrip(".")
        if len(errors) == 1:
            parts.append(f"1 block left as it is: {first}")
        else:
            others = listed([o for o, _ in errors[1:]])
            parts.append(f"{len(errors)} blocks left as they are: {first} (also {others}, the same class)")
    return "; ".join(parts)


def found_instead(skipped: Sequence[tuple[str, Skipped]], untraced: Sequence[Untraceable]) -> str:
    """What a model holds instead of a unit that can take an SE, by count, without the API's advice."""
    reasons: dict[tuple[str, str], int] = {}
    for _, skip in skipped:
        key = (_places(skip), skip.reason)
        reasons[key] = reasons.get(key, 0) + 1
    parts = [f"{n} {places} where {reason}" for (places, reason), n in reasons.items()]
    if untraced:
        classes = ", ".join(dict.fromkeys(u.class_name for u in untraced))
        parts.append(f"{len(untraced)} block(s) torch.fx cannot trace or run ({classes})")
    return "; ".join(parts[:3]) + (f"; and {len(parts) - 3} other kind(s)" if len(parts) > 3 else "")


def no_unit(message: str, found: str) -> SurgeryError:
    """The error for a model without a unit that can take an SE. ``found``, what the model holds instead (free of
    Python advice), is kept as ``error.no_unit``, so a command line can word its own way out."""
    error = SurgeryError(message)
    error.no_unit = found
    return error
