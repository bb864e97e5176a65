"""Fixtures.  Helpers live in tests/helpers; servers start through the
project's own ``forkserver`` fixture (forkserver/testing/pytest_plugin.py),
so the suite's teardown is the one users get: SIGTERM, exit status 0, no
unreaped child and nothing left running, or the test fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forkserver.testing.pytest_plugin import ServerFactory, ServerProcess
from tests.helpers.fuzz import register_profiles
from tests.helpers.servers import StartServer
from tests.helpers.tls import Pki, make_pki

# Every server the suite starts checks, at each fork, that the list of fds a
# child closes is not stale (forkserver/parent/fork.py).
os.environ["FORKSERVER_CHECK_FDS"] = "1"

# Hypothesis: a few seconds a property, or a long fuzz with FORKSERVER_FUZZ=1.
register_profiles()


@pytest.fixture
def start_server(forkserver: ServerFactory, tmp_path: Path) -> StartServer:
    """Factory: ``start_server(config_text=None, *args, ready=True, env=None, cwd=None)``.

    *config_text* is the body of a TOML file; *args* are extra CLI
    arguments; the server runs in *cwd* (default: tmp_path).  ``tests.*``
    handlers are importable.  Waits for "forkserver ready" unless *ready* is
    False.  Every server is checked and stopped by the ``forkserver`` fixture.
    """

    def start(
        config_text: str | None = None,
        *args: str,
        ready: bool = True,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ServerProcess:
        return forkserver.start(
            *args, config=config_text, ready=ready, env=env, cwd=cwd or tmp_path
        )

    return start


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and certificates (made with the openssl command), once per run."""
    return make_pki(tmp_path_factory.mktemp("pki"))
