"""A TOML file into :class:`~.settings.Settings`: its ``[server]`` and ``[[listen]]`` tables."""

from __future__ import annotations

import tomllib

from ..errors import ConfigError
from .checking import show
from .listen import LISTEN_TABLE
from .settings import TABLE, Settings

__all__ = ["load"]


def load(path: str) -> Settings:
    """Read a TOML file into :class:`Settings`; every problem is a ConfigError."""
    try:
        with open(path, "rb") as fp:
            document = tomllib.load(fp)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    extra = sorted(set(document) - {TABLE, LISTEN_TABLE})
    if extra:
        raise ConfigError(
            f"{path}: unknown table or key {extra[0]!r} "
            f"(expected a [{TABLE}] table and [[{LISTEN_TABLE}]] tables)"
        )
    table = document.get(TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {TABLE} must be a table, got {show(table)}")
    if LISTEN_TABLE in document:
        listen = document[LISTEN_TABLE]
        if not isinstance(listen, list) or not all(isinstance(t, dict) for t in listen):
            raise ConfigError(f"{path}: listen must be [[{LISTEN_TABLE}]] tables")
        if LISTEN_TABLE in table:
            raise ConfigError(
                f"{path}: give listeners as [[{LISTEN_TABLE}]] tables, not server.listen"
            )
        clash = sorted({"host", "port", "unix"} & set(table))
        if clash:
            raise ConfigError(
                f"{path}: server.{clash[0]} cannot be combined with [[{LISTEN_TABLE}]] "
                "tables: give every listener as a table"
            )
        table = {**table, LISTEN_TABLE: listen}
    return Settings.from_mapping(table, path)
