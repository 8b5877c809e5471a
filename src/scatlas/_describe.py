"""Short readable summaries of fitted objects (their ``repr``, as scvi-tools' and CellTypist's models print) and of names in messages."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type: reading a file's names in an error message imports no pydantic
    from pydantic import BaseModel


def listed(names: Sequence[object], limit: int = 6, show: Callable[[object], str] = str) -> str:
    """The first ``limit`` names (each as ``show`` writes it), comma-separated, then ``…`` and the count when there are more."""
    shown = ", ".join(map(show, names[:limit]))
    return shown if len(names) <= limit else f"{shown}, … ({len(names)} in all)"


def settings_line(config: BaseModel, skip: Iterable[str] = ("type", "name", "training")) -> str:
    """A model entry's settings as ``key=value`` pairs, without its type, name and training overrides."""
    values = config.model_dump(mode="json", exclude=set(skip))
    return ", ".join(f"{k}={v}" for k, v in values.items())


def closest(name: str, known: Iterable[object]) -> str | None:
    """The one of ``known`` closest to ``name`` (difflib's ratio at least 0.6), or ``None``: what a misspelt name meant."""
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: str, known: Iterable[object]) -> str:
    """``" (did you mean 'x'?)"`` with :func:`closest`'s name, to follow "... not found"; ``""`` when none is close."""
    close = closest(name, known)
    return f" (did you mean {close!r}?)" if close else ""


def described(head: str, lines: Iterable[str]) -> str:
    """``head`` and then each line indented by four spaces."""
    return "\n".join([head, *(f"    {line}" for line in lines)])
