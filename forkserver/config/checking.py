"""The checks every key gets from its declaration: type, range, choices, unknown keys.

Each error names the key, the bad value and what was expected, as in
``server.port must be an integer 0-65535, got "abc"``.  Only the command
line's process runs them: the lean parent rebuilds values checked before.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, OutOfRangeError
from .fields import Table
from .text import MAX_SHOWN, show, show_key

__all__ = ["check_fields", "describe", "field_types", "reject_unknown", "show"]


_TYPES: dict[type[Table], dict[str, Any]] = {}  # resolved once per table class


def field_types(cls: type[Table]) -> dict[str, Any]:
    """Each field of *cls* and its type, resolved from the annotations."""
    types = _TYPES.get(cls)
    if types is None:
        types = _TYPES[cls] = typing.get_type_hints(cls)
    return types


def _table_of(kind: Any) -> type[Table] | None:
    """The table class of an array-of-tables field (``tuple[Listen, ...]``), or None."""
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if isinstance(item, type) and issubclass(item, Table):
            return item
    return None


def _single_table(kind: Any) -> type[Table] | None:
    """The table class of a one-table field (``Sandbox | None``), or None."""
    args = typing.get_args(kind)
    if len(args) == 2 and type(None) in args:
        item = args[0] if args[1] is type(None) else args[1]
        if isinstance(item, type) and issubclass(item, Table):
            return item
    return None


def _key(cls: type[Table], name: str) -> str:
    """A key as messages name it: "server.port", "[[listen]] tcp"."""
    return f"{cls.section} {name}" if cls.section.startswith("[[") else f"{cls.section}.{name}"


def reject_unknown(cls: type[Table], values: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first key of *values* that *cls* does not have."""
    known = set(cls.__annotations__)  # its fields, even before complete()
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(key, known, n=1) if len(key) <= MAX_SHOWN else []
        hint = f'did you mean "{close[0]}"?' if close else f"known keys: {', '.join(sorted(known))}"
        array = cls.section.startswith("[[")
        shown = f"{show_key(key)} in {cls.section}" if array else f"{cls.section}.{show_key(key)}"
        raise ConfigError(f"unknown key {shown} ({hint})")


def check_fields(table: Table) -> None:
    """Check and normalise every field of *table* in place (its __post_init__)."""
    for f in dataclasses.fields(table):  # type: ignore[arg-type]
        value = _checked(type(table), f, getattr(table, f.name))
        object.__setattr__(table, f.name, value)


def describe(cls: type[Table], f: dataclasses.Field[Any]) -> str:
    """What a field expects, in words, for error messages and the README."""
    kind = field_types(cls)[f.name]
    if _table_of(kind) is not None:
        return "an array of tables"
    if _single_table(kind) is not None:
        return "a table"
    lo, hi, choices = f.metadata["min"], f.metadata["max"], f.metadata["choices"]
    if choices:
        return "one of " + ", ".join(f'"{c}"' for c in choices)
    if kind is int:
        text = "an integer"
    elif kind is float:
        text = "a number"
    elif kind is str:
        return "a string"
    elif kind is bool:
        return "true or false"
    else:
        return "a string or a list of strings"
    if lo is None or hi is None:
        return text
    if f.metadata["octal"]:  # a mode; below 0 only -1, "inherited"
        return f"{text} 0o000-0o{int(hi):03o}" + (", or -1" if lo < 0 else "")
    return f"{text} {lo:g}-{hi:g}" if kind is float else f"{text} {lo}-{hi}"


def _checked(cls: type[Table], f: dataclasses.Field[Any], value: Any) -> Any:
    """*value* checked and normalised for field *f*; ConfigError naming the key if bad."""
    kind = field_types(cls)[f.name]
    octal = f.metadata["octal"] and type(value) is int and 0 <= value < 1 << 64
    shown = f"0o{value:o}" if octal else show(value)
    key = _key(cls, f.name)
    bad = ConfigError(f"{key} must be {describe(cls, f)}, got {shown}")
    # A NUL would be cut off silently (or raise) wherever a string meets the OS.
    nul = ConfigError(f"{key} must not contain a NUL character, got {shown}")
    item_cls = _table_of(kind)
    one_cls = _single_table(kind)
    if one_cls is not None:
        if isinstance(value, Mapping):
            reject_unknown(one_cls, value)
            return one_cls(**value)
        if value is None or isinstance(value, one_cls):
            return value
        raise bad
    if item_cls is not None:
        if not isinstance(value, list | tuple):
            raise bad
        tables = []
        for item in value:
            if isinstance(item, Mapping):
                reject_unknown(item_cls, item)
                tables.append(item_cls(**item))
            elif isinstance(item, item_cls):
                tables.append(item)
            else:
                raise bad
        value = tuple(tables)
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        try:
            value = float(value)
        except OverflowError:  # an integer too large for a float
            raise bad from None
        if not math.isfinite(value):
            raise bad
    elif kind is str:
        if not isinstance(value, str):
            raise bad
        if "\0" in value:
            raise nul
        if f.metadata["choices"]:
            value = value.lower()
            if value not in f.metadata["choices"]:
                raise bad
    elif kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif isinstance(value, str) or (
        isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    ):
        value = (value,) if isinstance(value, str) else tuple(value)
        if any("\0" in v for v in value):
            raise nul
    else:
        raise bad
    lo, hi = f.metadata["min"], f.metadata["max"]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        # Also an OverflowError: what socketserver's bind() raises for a port of -1.
        raise OutOfRangeError(str(bad))
    if f.metadata["check"] is not None and value and (problem := f.metadata["check"](value)):
        raise ConfigError(f"{key}: {problem}")
    return value
