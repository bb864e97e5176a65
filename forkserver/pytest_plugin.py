"""The ``forkserver`` fixture's old home: its names, re-exported.

The plugin is ``forkserver.testing.pytest_plugin``, registered through the
``pytest11`` entry point.  The fixture function is handed out only on
request (``from forkserver.pytest_plugin import forkserver``): a module
attribute would define the fixture a second time wherever pytest scans this
module (``-p forkserver.pytest_plugin``, ``pytest_plugins = [...]``).
"""

from __future__ import annotations

from typing import Any

from forkserver.testing.pytest_plugin import ServerFactory, ServerProcess

# "forkserver" comes from __getattr__ below.
__all__ = ["ServerFactory", "ServerProcess", "forkserver"]  # noqa: F822


def __getattr__(name: str) -> Any:
    if name == "forkserver":
        from forkserver.testing import pytest_plugin

        return pytest_plugin.forkserver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
