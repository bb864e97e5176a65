"""Configuring and running the real ``python -m forkserver``.

Servers are started by the ``start_server`` fixture (conftest.py), which
hands them to the project's own ``forkserver`` fixture: the teardown that
users get (SIGTERM, exit 0, nothing left running) is the suite's too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forkserver.testing.config import toml_table
from forkserver.testing.pytest_plugin import ServerProcess

__all__ = [
    "ABNORMAL_EXIT",
    "FORK_ON_ACCEPT",
    "MODES",
    "POOL",
    "ROOT",
    "ServerProcess",
    "StartServer",
    "assert_config_refused",
    "config",
    "run_forkserver",
    "wait_until",
    "write_module",
]

ROOT = Path(__file__).resolve().parent.parent.parent

# ``start_server(config_text=None, *args, ready=True, env=None, cwd=None)``
StartServer = Callable[..., ServerProcess]

# Lines the parent logs for a child that did not exit 0.
ABNORMAL_EXIT = re.compile(r"child \d+ for .* (exit status|killed by)")

# The two ways a connection gets its child: forked on accept, or handed to one
# of the pre-forked spares.  Settings to merge into config().
FORK_ON_ACCEPT: dict[str, Any] = {}
POOL: dict[str, Any] = {"spare_children": 2}
MODES = [pytest.param(FORK_ON_ACCEPT, id="fork"), pytest.param(POOL, id="pool")]


def config(handler: str = "forkserver.examples.echo:EchoHandler", **settings: Any) -> str:
    """A [server] table with port 0 on loopback plus *settings*, as TOML text."""
    return toml_table("server", {"host": "127.0.0.1", "port": 0, "handler": handler, **settings})


def write_module(path: Path, source: str) -> None:
    """Write a handler module, and drop its cached bytecode: a version written
    in the same second as the last, with the same size, would otherwise be
    imported from the stale .pyc (Python checks only mtime and size)."""
    path.write_text(source)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(importlib.util.cache_from_source(str(path)))


def run_forkserver(
    *args: str, cwd: Path, timeout: float = 20.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m forkserver ARGS`` to completion, for runs that must not serve.

    ``tests.*`` importable.  A run that wrongly starts serving is killed at
    *timeout* and fails the test.
    """
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "forkserver", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def assert_config_refused(result: subprocess.CompletedProcess[str]) -> None:
    """A config error, as a user must see it: exit 2, nothing served or
    printed on stdout, one line on stderr naming forkserver, no traceback."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("forkserver: "), result.stderr


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll *predicate* (for outcomes with no event to wait on, e.g. reaping)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)
