"""The one-line texts for what the surgery leaves without an SE: skipped sums by reason, blocks fx cannot trace."""

from __future__ import annotations

from typing import Sequence

from ..errors import SurgeryError
from .skips import Skipped, Untraceable

__all__ = ["listed", "grouped", "found_instead", "no_unit"]

def listed(owners: list[str]) -> str:
    """The first four names, then how many more."""
    return ", ".join(owners[:4]) + (f" and {len(owners) - 4} more" if len(owners) > 4 else "")


def grouped(skipped: Sequence[tuple[str, Skipped]], untraced: Sequence[Untraceable] = ()) -> str:
    """One line for everything left without SE: sums by reason, then blocks fx could not trace or run, by class."""
    by_reason: dict[str, list[str]] = {}
    for owner, skip in skipped:
        by_reason.setdefault(skip.reason, []).append(owner or "<top>")
    by_class: dict[str, list[tuple[str, SurgeryError]]] = {}
    for u in untraced:
        by_class.setdefault(u.class_name, []).append((u.owner or "<top>", u.error))
    parts = [f"{len(owners)} sum(s) where {reason} ({listed(owners)})" for reason, owners in by_reason.items()]
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
    reasons: dict[str, int] = {}
    for _, skip in skipped:
        reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
    parts = [f"{n} sum(s) where {reason}" for reason, n in reasons.items()]
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
