"""Reading fields of raw records, strictly: a wrong type or a missing field is an error naming both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["class_index", "text", "texts"]


def text(record: dict[str, Any], field: str, where: str, allow_empty: bool = False) -> str:
    """The string in ``record[field]``."""
    if field not in record or record[field] is None:
        raise ValueError(f"{where}: missing field {field!r} (fields: {sorted(record)})")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be text, got {type(value).__name__} {value!r}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def texts(record: dict[str, Any], field: str, where: str) -> list[str]:
    """A non-empty list of non-empty strings in ``record[field]`` (a single string counts as one)."""
    if field not in record or record[field] is None:
        raise ValueError(f"{where}: missing field {field!r} (fields: {sorted(record)})")
    value = record[field]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: field {field!r} must be a non-empty list of strings, got {value!r}")
    for item in values:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{where}: field {field!r} holds {item!r}, not a non-empty string")
    return values


def class_index(record: dict[str, Any], field: str, where: str, names: Sequence[Any],
                allow_index: bool = True) -> int:
    """The class of ``record[field]``: the position of an equal name of the same type in ``names``.

    With ``allow_index``, an integer ``0 <= v < len(names)`` is taken as the class index itself
    (the hub's encoding of string labels). Types are never coerced: ``"1"`` is not ``1``, and
    ``1.0`` and ``True`` are not ``1`` unless ``names`` holds that exact type.
    """
    if field not in record or record[field] is None:
        raise ValueError(f"{where}: missing field {field!r} (fields: {sorted(record)})")
    value = record[field]
    for index, name in enumerate(names):
        if type(value) is type(name) and value == name:
            return index
    if allow_index and type(value) is int and 0 <= value < len(names):
        return value
    accepted = list(names) + ([f"0..{len(names) - 1}"] if allow_index else [])
    raise ValueError(f"{where}: label {value!r} ({type(value).__name__}) in field {field!r} is not one of {accepted}")
