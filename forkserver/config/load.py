"""A TOML file into :class:`~.settings.Settings`: its ``[server]`` and ``[[listen]]`` tables.

Whatever the file holds, the outcome is Settings or one ConfigError: tomllib
raises more than TOMLDecodeError on hostile input (ValueError for an integer
of over 4,300 digits, RecursionError for arrays nested a thousand deep).
Relative paths are joined to the file's directory (``paths.py``).
"""

from __future__ import annotations

import os
import sys
import tomllib

from ..errors import ConfigError
from .listen import LISTEN_TABLE, Listen
from .paths import resolve_paths
from .sandbox import SANDBOX_TABLE, Sandbox
from .settings import TABLE, Settings
from .text import show, show_key

__all__ = ["load"]


def load(path: str) -> Settings:
    """Read a TOML file into :class:`Settings`; every problem is a ConfigError."""
    document = _read(path)
    extra = sorted(set(document) - {TABLE, LISTEN_TABLE, SANDBOX_TABLE})
    if extra:
        raise ConfigError(
            f"{path}: unknown table or key {show_key(extra[0])} "
            f"(expected a [{TABLE}] table, [[{LISTEN_TABLE}]] tables and a [{SANDBOX_TABLE}] table)"
        )
    table = document.get(TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {TABLE} must be a table, got {show(table)}")
    directory = os.path.dirname(path)
    table = resolve_paths(Settings, table, directory)
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
        listen = [_listen_paths(t, directory) for t in listen]
        table = {**table, LISTEN_TABLE: listen}
    if SANDBOX_TABLE in table:
        raise ConfigError(
            f"{path}: give the sandbox as a [{SANDBOX_TABLE}] table, not server.sandbox"
        )
    if SANDBOX_TABLE in document:
        sandbox = document[SANDBOX_TABLE]
        if not isinstance(sandbox, dict):
            raise ConfigError(f"{path}: {SANDBOX_TABLE} must be a table, got {show(sandbox)}")
        table = {**table, SANDBOX_TABLE: resolve_paths(Sandbox, sandbox, directory)}
    return Settings.from_mapping(table, path)


def _listen_paths(table: dict[str, object], directory: str) -> dict[str, object]:
    """A [[listen]] table's paths, and its [listen.sandbox]'s, joined to *directory*."""
    resolved = resolve_paths(Listen, table, directory)
    sandbox = resolved.get(SANDBOX_TABLE)
    if isinstance(sandbox, dict):
        resolved[SANDBOX_TABLE] = resolve_paths(Sandbox, sandbox, directory)
    return resolved


def _read(path: str) -> dict[str, object]:
    """The file's TOML document; a ConfigError for anything that stops reading it."""
    try:
        with open(path, "rb") as fp:
            data = fp.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except ValueError:  # a NUL in the path: only from Python, never from a command line
        raise ConfigError(f"{show(path)}: cannot read config: not a file name") from None
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        limit = sys.get_int_max_str_digits()
        raise ConfigError(f"{path}: invalid TOML: an integer of over {limit} digits") from None
