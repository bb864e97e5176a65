"""What the fields generate besides checks: the command line's flags and the README table."""

from __future__ import annotations

import dataclasses
from typing import Any

from .checking import describe, field_types
from .fields import Table, complete
from .listen import LISTEN_TABLE, Listen
from .sandbox import SANDBOX_TABLE, Sandbox
from .settings import Settings

__all__ = ["cli_flags", "field_type", "listen_flags", "metavar", "reference_table", "toml_literal"]


def cli_flags() -> list[tuple[str, dataclasses.Field[Any]]]:
    """(flag, field) for every setting that has a command-line override."""
    return [(f.metadata["cli"], f) for f in _fields(Settings) if f.metadata["cli"]]


def listen_flags() -> list[tuple[str, dataclasses.Field[Any]]]:
    """(flag, field) for the [[listen]] keys that ``--bind`` listeners take from flags."""
    return [(f.metadata["cli"], f) for f in _fields(Listen) if f.metadata["cli"]]


def field_type(f: dataclasses.Field[Any]) -> Any:
    """The type of a :class:`Settings` or :class:`Listen` field (int, str, ...), for its flag."""
    cls = Settings if any(f is g for g in _fields(Settings)) else Listen
    return field_types(cls)[f.name]


def metavar(f: dataclasses.Field[Any]) -> str:
    """What a flag's value is called in ``--help``: declared, its choices, or its type's."""
    if f.metadata["metavar"]:
        return str(f.metadata["metavar"])
    if f.metadata["choices"]:
        return "{" + ",".join(f.metadata["choices"]) + "}"
    return {int: "N", float: "SECONDS"}[field_type(f)]


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
        default = "(none)" if f.default is None else default
        rows.append(f"| `{f.name}` | {default} | {_flag(f)} | {_meaning(Settings, f)} |")
    rows += ["", f"Each `[[{LISTEN_TABLE}]]` table (`--bind` makes them from the command line):"]
    rows += ["", "| key | default | flag | meaning |", "| --- | --- | --- | --- |"]
    for f in _fields(Listen):
        default = f"`{toml_literal(f, f.default)}`"
        rows.append(f"| `{f.name}` | {default} | {_flag(f)} | {_meaning(Listen, f)} |")
    rows += ["", f"The `[{SANDBOX_TABLE}]` table (docs/sandbox.md):"]
    rows += ["", "| key | default | meaning |", "| --- | --- | --- |"]
    for f in _fields(Sandbox):
        default = f"`{toml_literal(f, f.default)}`"
        rows.append(f"| `{f.name}` | {default} | {_meaning(Sandbox, f)} |")
    return "\n".join(rows)


def _flag(f: dataclasses.Field[Any]) -> str:
    return f"`{f.metadata['cli']} {metavar(f)}`" if f.metadata["cli"] else ""


def _meaning(cls: type[Table], f: dataclasses.Field[Any]) -> str:
    meaning = f"{f.metadata['help']} Expects {describe(cls, f)}."
    if f.metadata["path"]:
        meaning += " In a config file, relative to the file's directory."
    return meaning


def _fields(cls: type[Table]) -> tuple[dataclasses.Field[Any], ...]:
    complete()
    return dataclasses.fields(cls)  # type: ignore[arg-type]
