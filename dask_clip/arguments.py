"""Checks of the arguments users give, each raising ``UsageError`` with the argument's name and value."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, TypeVar

from dask_clip.errors import UsageError

T = TypeVar("T")


def at_least(name: str, value: int, minimum: int = 1) -> int:
    """``value`` when it is an integer ``>= minimum``, else ``UsageError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer of at least {minimum}, not {value!r}")
    return value


def fraction(name: str, value: float) -> float:
    """``value`` when it is a number from 0 to 1 (a share of one device), else ``UsageError``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise UsageError(f"{name} must be a number from 0 to 1 (a share of one GPU), not {value!r}")
    return float(value)


def share(name: str, value: float) -> float:
    """``value`` when it is a number greater than 0 and at most 1 (a share of the rows), else ``UsageError``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise UsageError(f"{name} must be a number greater than 0 and at most 1 (0.3: 30% of the rows), not {value!r}")
    return float(value)


def one_of(name: str, value: T, choices: Collection[T]) -> T:
    """``value`` when it is one of ``choices``, else ``UsageError`` listing them."""
    if value not in choices:
        raise UsageError(f"{name} must be one of {tuple(choices)}, not {value!r}")
    return value


def model_id(name: str, value: Any) -> str:
    """A non-empty model identifier (hub id or folder) as a string."""
    if not value or not str(value).strip():
        raise UsageError(f"{name} is empty: give a hub id or a local save_pretrained directory")
    return str(value)


def alias(name: str, value: T, alias_name: str, alias_value: T | None, default: T) -> T:
    """Resolve an option that also has an alias (NeMo Curator's spelling): the one given, or ``default``.

    Giving both with different values is a ``UsageError``.
    """
    if alias_value is None:
        return default if value is None else value
    if value is not None and value != alias_value:
        raise UsageError(f"{name}={value!r} and its alias {alias_name}={alias_value!r} disagree: give one")
    return alias_value
