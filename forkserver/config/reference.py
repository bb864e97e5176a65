"""What the fields generate besides checks: the command line's flags and the README table."""

from __future__ import annotations

import dataclasses
from typing import Any

from .checking import describe, field_types
from .fields import Table, complete
from .listen import LISTEN_TABLE, Listen
from .settings import Settings

__all__ = ["cli_flags", "field_type", "reference_table", "toml_literal"]


def cli_flags() -> list[tuple[str, dataclasses.Field[Any]]]:
    """(flag, field) for every setting that has a command-line override."""
    return [(f.metadata["cli"], f) for f in _fields(Settings) if f.metadata["cli"]]


def field_type(f: dataclasses.Field[Any]) -> Any:
    """The type of a :class:`Settings` field (int, float, str, ...), for its flag."""
    return field_types(Settings)[f.name]


def toml_literal(f: dataclasses.Field[Any], value: Any) -> str:
    """*value* of field *f* as written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if f.metadata["octal"] and value >= 0:
        return f"0o{value:o}"
    if isinstance(value, str):
        return f'"{value}"'
    return f"{value!r}"


def reference_table() -> str:
    """The README's config reference: [server], then [[listen]], as Markdown tables."""
    rows = ["| key | default | flag | meaning |", "| --- | --- | --- | --- |"]
    for f in _fields(Settings):
        default = "(required)" if f.name == "handler" else f"`{toml_literal(f, f.default)}`"
        flag = f"`{f.metadata['cli']}`" if f.metadata["cli"] else ""
        meaning = f"{f.metadata['help']} Expects {describe(Settings, f)}."
        rows.append(f"| `{f.name}` | {default} | {flag} | {meaning} |")
    rows += ["", f"Each `[[{LISTEN_TABLE}]]` table:", ""]
    rows += ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in _fields(Listen):
        meaning = f"{f.metadata['help']} Expects {describe(Listen, f)}."
        rows.append(f"| `{f.name}` | `{toml_literal(f, f.default)}` | {meaning} |")
    return "\n".join(rows)


def _fields(cls: type[Table]) -> tuple[dataclasses.Field[Any], ...]:
    complete()
    return dataclasses.fields(cls)  # type: ignore[arg-type]
