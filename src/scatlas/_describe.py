"""Short readable summaries of fitted objects (their ``repr``, as scvi-tools' and CellTypist's models print)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from pydantic import BaseModel


def listed(names: Sequence[object], limit: int = 6, show: Callable[[object], str] = str) -> str:
    """The first ``limit`` names (each as ``show`` writes it), comma-separated, then ``…`` and the count when there are more."""
    shown = ", ".join(map(show, names[:limit]))
    return shown if len(names) <= limit else f"{shown}, … ({len(names)} in all)"


def settings_line(config: BaseModel, skip: Iterable[str] = ("type", "name", "training")) -> str:
    """A model entry's settings as ``key=value`` pairs, without its type, name and training overrides."""
    values = config.model_dump(mode="json", exclude=set(skip))
    return ", ".join(f"{k}={v}" for k, v in values.items())


def described(head: str, lines: Iterable[str]) -> str:
    """``head`` and then each line indented by four spaces."""
    return "\n".join([head, *(f"    {line}" for line in lines)])
