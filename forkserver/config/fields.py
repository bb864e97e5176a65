"""Declaring a config table: the ``setting()`` field helper and the ``Table`` base.

A table class (:class:`~.settings.Settings` for ``[server]``,
:class:`~.listen.Listen` for each ``[[listen]]``) is a frozen dataclass that
declares every key once, as an annotated attribute set to
``setting(default, help, ...)``.  The checks themselves are in ``checking.py``.
"""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, Self

__all__ = ["Table", "setting"]


def setting(
    default: Any,
    help: str,
    *,
    cli: str | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    octal: bool = False,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """One key of a table: its default, help text, command-line flag and limits.

    *octal*: the value is a file mode, shown as 0o...; *check* returns what is
    wrong with a (non-empty) value, or None, or raises ConfigError itself for a
    message that does not start with the key."""
    meta = {"help": help, "cli": cli, "min": min, "max": max, "choices": choices}
    return dataclasses.field(default=default, metadata={**meta, "octal": octal, "check": check})


class Table:
    """Base of the config's tables: construction checks every key."""

    __slots__ = ()
    # How the table is named in messages: "server" (server.port) or "[[listen]]".
    # Not annotated: an annotation would make it a field.
    section = ""

    def __post_init__(self) -> None:
        from .checking import check_fields

        check_fields(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> Self:
        """Build a table from a TOML-like mapping, checked; *source* prefixes every error."""
        from .checking import reject_unknown

        try:
            reject_unknown(cls, values)
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
