"""Configuration: one typed source of truth for TOML, the command line and the README.

Every setting is a field of a table class whose metadata holds its help text,
its allowed range and its command-line flag; the TOML loader, the CLI's flags
and the README's reference table are generated from those fields, so a
setting is written down exactly once.

* ``settings.py``: ``[server]``, every setting (:class:`Settings`);
* ``listen.py``: ``[[listen]]``, one listener's table (:class:`Listen`);
* ``sandbox.py``: ``[sandbox]`` (and ``[listen.sandbox]``), each connection's sandbox;
* ``fields.py``: how a table is declared (``setting()``, the ``Table`` base);
* ``checking.py``: the checks every key gets (type, range, choices, unknown keys);
* ``values.py``: the checks some values get (networks, early drop, accounts, ...);
* ``paths.py``: path settings, relative to the config file, and their checks;
* ``text.py``: values and messages escaped into one printable line;
* ``load.py``: a TOML file into Settings;
* ``reference.py``: the CLI's flags and the README table.

The names below load their module on first use (PEP 562): the serving parent
imports ``forkserver.config.settings`` alone, to rebuild its settings with
``Settings.from_dict``, and must not pay for tomllib or the checks.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # what the lazy attributes below resolve to, for the type checker
    from ..errors import ConfigError
    from .listen import LISTEN_TABLE, Listen
    from .load import load
    from .reference import cli_flags, field_type, listen_flags, metavar, reference_table
    from .settings import LOG_LEVELS, TABLE, Settings

__all__ = [
    "LISTEN_TABLE",
    "LOG_LEVELS",
    "TABLE",
    "ConfigError",
    "Listen",
    "Settings",
    "cli_flags",
    "field_type",
    "listen_flags",
    "load",
    "metavar",
    "reference_table",
]

_HOME = {
    "ConfigError": "forkserver.errors",
    "LISTEN_TABLE": "forkserver.config.listen",
    "Listen": "forkserver.config.listen",
    "LOG_LEVELS": "forkserver.config.settings",
    "TABLE": "forkserver.config.settings",
    "Settings": "forkserver.config.settings",
    "load": "forkserver.config.load",
    "cli_flags": "forkserver.config.reference",
    "field_type": "forkserver.config.reference",
    "listen_flags": "forkserver.config.reference",
    "metavar": "forkserver.config.reference",
    "reference_table": "forkserver.config.reference",
}


def __getattr__(name: str) -> object:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    from .fields import complete

    value = getattr(import_module(module), name)
    if name in ("Settings", "Listen"):
        complete()  # full dataclasses from here: dataclasses.fields(Settings) works
    globals()[name] = value
    return value
