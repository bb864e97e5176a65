"""Declaring a config table: the ``setting()`` field helper and the ``Table`` base.

A table class (:class:`~.settings.Settings` for ``[server]``,
:class:`~.listen.Listen` for each ``[[listen]]``) declares every key once, as
an annotated attribute set to ``setting(default, help, ...)``, and is declared
a frozen dataclass.  It becomes one only when first needed (:func:`complete`,
on the first construction or through ``forkserver.config``): ``import
dataclasses`` brings inspect, re and 20 more modules, ~2 MB that the serving
parent would copy at every fork, and that parent only rebuilds checked values
(:meth:`Table.from_dict`).  So this module imports nothing from the standard
library; the checks themselves are in ``checking.py``.
"""

from __future__ import annotations

from ..errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    # The type checker sees the dataclass each table becomes (see complete()).
    from dataclasses import dataclass as deferred_dataclass
    from typing import Any, Self
else:

    def deferred_dataclass(**options: object) -> Callable[[type], type]:
        """Remember *options* for complete(), which makes the class a dataclass."""

        def mark(cls: type) -> type:
            cls._dataclass_options = options
            return cls

        return mark


__all__ = ["Table", "complete", "deferred_dataclass", "setting"]


class _Declared:
    """One key as declared, until complete() makes it a ``dataclasses.Field``."""

    __slots__ = ("default", "metadata")

    def __init__(self, default: Any, metadata: dict[str, Any]) -> None:
        self.default = default
        self.metadata = metadata


def setting(
    default: Any,
    help: str,
    *,
    cli: str | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    octal: bool = False,
    path: bool = False,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """One key of a table: its default, help text, command-line flag and limits.

    *metavar*: what the flag's value is called in ``--help`` (FILE, HOST:PORT);
    *octal*: the value is a file mode, shown as 0o...; *path*: a file path, which
    a config file gives relative to its own directory; *check* returns what is
    wrong with a (non-empty) value, or None, or raises ConfigError itself for a
    message that does not start with the key."""
    meta: dict[str, Any] = {"help": help, "cli": cli, "metavar": metavar, "min": min}
    meta.update(max=max, choices=choices, octal=octal, path=path, check=check)
    return _Declared(default, meta)


def complete() -> None:
    """Make every table class the dataclass it is declared to be, all at once (a
    Settings holds Listens); imports dataclasses.  Done once; cheap after."""
    for cls in Table.__subclasses__():
        if "__dataclass_fields__" in cls.__dict__:
            continue
        import dataclasses

        for name in cls.__annotations__:
            declared = cls.__dict__[name]
            field = dataclasses.field(default=declared.default, metadata=declared.metadata)
            setattr(cls, name, field)
        dataclasses.dataclass(**cls.__dict__["_dataclass_options"])(cls)


class Table:
    """Base of the config's tables: checked construction, unchecked rebuilding."""

    __slots__ = ()
    # How the table is named in messages: "server" (server.port) or "[[listen]]".
    # Not annotated: an annotation would make it a field.
    section = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        if "__dataclass_fields__" not in cls.__dict__:
            complete()  # the dataclass __init__ then runs: it is looked up after __new__
        return super().__new__(cls)

    # Frozen before complete() too (a rebuilt table); the dataclass puts its own in
    # the subclass, which raises dataclasses.FrozenInstanceError (an AttributeError).
    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: a config table is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: a config table is frozen")

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

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """The table holding *values* as they are: what ``dataclasses.asdict`` gave
        for a checked table (across exec(), say).  Nothing is checked again and
        nothing is imported: the lean parent's way to a real table."""
        if values.keys() != cls.__annotations__.keys():
            wrong = sorted(values.keys() ^ cls.__annotations__.keys())
            raise TypeError(f"{cls.__name__}.from_dict: keys differ from the fields: {wrong}")
        table = object.__new__(cls)  # not cls(): no dataclass needed, no check
        table.__dict__.update(values)
        return table
