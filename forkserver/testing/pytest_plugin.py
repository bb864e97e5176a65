"""pytest plugin: serve your handler from a real forkserver in your own tests.

Registered through the ``pytest11`` entry point, so installing forkserver is
enough::

    def test_upper(forkserver):
        server = forkserver("myservice:Upper", max_children=8)
        with server.connect() as sock:
            sock.sendall(b"hi\\n")
            assert sock.makefile("rb").readline() == b"HI\\n"

Each call starts ``python -m forkserver`` (the same program as in
production) in its own session, on 127.0.0.1 port 0 unless told otherwise,
and returns once the server has logged ``forkserver ready``.  At teardown the
server gets SIGTERM and must exit 0 leaving no process behind: a process of
its session or process group still running after it exited (a grandchild the
handler forked and never waited for, say), a child it did not reap, or a
non-zero exit fails the test, listing the leftovers and the end of the log.
Everything the server started is then killed, whatever the outcome.

Only pytest imports this module; the server never does.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from forkserver.testing import leaks, process
from forkserver.testing.config import environment, handler_name, toml_table

__all__ = ["ServerFactory", "ServerProcess", "forkserver"]

DEFAULT_GRACEFUL_TIMEOUT = 5.0  # a failed test may still hold a connection open
SERVER_KILL_TIMEOUT = 5.0  # the server's own default kill_timeout
LOG_TAIL = 25


class ServerProcess(process.ServerProcess):
    """A forkserver started by the ``forkserver`` fixture.

    ``address`` is the first listener the server reported: ``(host, port)``
    for TCP, the path for a Unix socket; ``addresses`` lists them all.
    """

    def __init__(
        self, argv: Sequence[str], *, handler: str, stop_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(argv, name="forkserver", **kwargs)
        self.handler = handler
        self.stop_timeout = stop_timeout
        self.problems: list[str] = []  # what teardown reports
        self.reported = False  # its problems were already reported (a failed start)
        self.config_path: Path | None = None  # the --config file the fixture wrote

    @property
    def config_file(self) -> Path:
        """The config file the fixture wrote for it (rewrite it, then SIGHUP, to reload)."""
        if self.config_path is None:
            raise AssertionError(f"forkserver pid {self.pid} was started without a config file")
        return self.config_path

    def __repr__(self) -> str:
        return f"<forkserver pid {self.pid} {self.handler} at {self.addresses}>"

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, wait for the exit, and return the exit status (-N: killed by signal N).

        The status is then yours to check; leaked processes still fail the test
        at teardown.  A server that does not exit within *timeout* is killed.
        """
        self.status_taken = True
        return self.stop_checked(timeout)

    def stop_checked(self, timeout: float | None = None) -> int:
        """Stop it as teardown does, noting in :attr:`problems` zombies before the
        stop, a stop that takes longer than *timeout*, processes left after the
        exit and an exit status not 0 that nobody took; then kill everything."""
        if self.returncode is not None:  # exited, and reaped: what is left?
            left = leaks.leftovers(self.pid)
            self._note_leftovers(left)
            leaks.kill_everything(self.pgid, left)
            self._reaped(self.returncode, read_all=True)
            return self.returncode
        timeout = self.stop_timeout if timeout is None else timeout
        running_before = not self.wait_exit(0)
        seen: list[psutil.Process] = []
        exited = True
        if running_before:
            if zombies := leaks.zombies(self.pid):
                self.problems.append(
                    f"{len(zombies)} child(ren) exited but were not reaped within "
                    f"{leaks.ZOMBIE_GRACE:g} s (zombies): {', '.join(str(p.pid) for p in zombies)}"
                )
            seen = leaks.descendants(self.pid)
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # exited just now; its status says how
            exited = self.wait_exit(timeout)
        if exited:
            left = leaks.leftovers(self.pid, seen)
            self._note_leftovers(left)
        else:
            left = leaks.descendants(self.pid)
            self.problems.append(
                f"it did not exit within {timeout:g} s of SIGTERM; its processes then:\n"
                + (leaks.describe(left) or "    (none)")
            )
        leaks.kill_everything(self.pgid, left)
        status = self._proc.wait()
        self._reaped(status, read_all=True)
        if status != 0 and not self.status_taken:
            when = "after SIGTERM" if running_before else "during the test"
            self.problems.append(f"it exited {when} with {leaks.status_text(status)} (expected 0)")
        return status

    def abandon(self, timeout: float) -> str:
        """Kill a server that did not get ready, and everything it started; why."""
        # Its output ended: it is exiting (with a one-line error, most likely).
        exited = self._eof and self.wait_exit(5.0)
        self.reported = True  # the failure is reported now, not at teardown
        leaks.kill_everything(self.pgid, leaks.descendants(self.pid))
        status = self._proc.wait()
        self._reaped(status, read_all=True)
        if exited:
            return f"exited with {leaks.status_text(status)} before it was ready"
        return f"was not ready within {timeout:g} s"

    def report(self) -> str:
        """The teardown failure for this server, or "" when all was well."""
        if self.reported or not self.problems:
            return ""
        with self._cond:
            tail = self.lines[-LOG_TAIL:]
        return (
            f"forkserver pid {self.pid} ({self.title}) did not stop cleanly:\n"
            + "".join(f"- {problem}\n" for problem in self.problems)
            + "Anything it left running was killed. "
            + f"Last {len(tail)} lines of its log:\n"
            + "\n".join(f"    {line}" for line in tail)
        )

    @property
    def title(self) -> str:
        """ "handler NAME", or the command line if the handler is not known."""
        return f"handler {self.handler}" if self.handler else " ".join(self.argv[1:])

    def _note_leftovers(self, left: Sequence[psutil.Process]) -> None:
        if left:
            self.problems.append(
                f"{len(left)} process(es) it started were still running after it "
                "exited (leaked by the handler? whatever a child forks must exit with "
                f"it):\n{leaks.describe(left)}"
            )


class ServerFactory:
    """What the ``forkserver`` fixture returns: call it to start a server."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, rootdir: Path) -> None:
        self._tmp_path_factory = tmp_path_factory
        self._rootdir = rootdir
        self._dir: Path | None = None
        self.servers: list[ServerProcess] = []

    def __call__(
        self,
        handler: object,
        *,
        ready_timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        **settings: Any,
    ) -> ServerProcess:
        """Start ``python -m forkserver`` serving *handler* and wait until it is ready.

        *handler* is "module:attr" or the class or function itself.  *settings*
        are [server] keys (``max_children=8``, ``unix="/tmp/s.sock"``, ...);
        the defaults are ``host="127.0.0.1"`` (none when ``unix`` is given),
        ``port=0`` and ``graceful_timeout=5``.  The server runs in the current
        directory with this test's import path; *env* adds variables.
        """
        name = handler_name(handler)
        values: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
        if settings.get("unix"):
            values["host"] = []
        values["graceful_timeout"] = DEFAULT_GRACEFUL_TIMEOUT
        values.update({k: v for k, v in settings.items() if v is not None})
        values["handler"] = name
        if str(values.get("log_level", "info")).lower() not in ("debug", "info"):
            raise ValueError(
                f"forkserver fixture: log_level={values['log_level']!r} hides the "
                '"listening on" and "forkserver ready" lines it waits for; use "info" or "debug"'
            )
        stop_timeout = (
            _number(values, "graceful_timeout")
            + _number(values, "kill_timeout", SERVER_KILL_TIMEOUT)
            + 10.0
        )
        return self.start(
            config=toml_table("server", values),
            handler=name,
            ready_timeout=ready_timeout,
            env=env,
            stop_timeout=stop_timeout,
        )

    def start(
        self,
        *args: str,
        config: str | None = None,
        handler: str = "",
        ready: bool = True,
        ready_timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stop_timeout: float | None = None,
    ) -> ServerProcess:
        """Start ``python -m forkserver ARGS``, with ``--config`` a file holding
        the TOML text *config* if given; wait until it is ready unless *ready*
        is False.  Checked at teardown like every server of the fixture; the
        default *stop_timeout* allows for the server's own default timeouts."""
        argv = [sys.executable, "-m", "forkserver"]
        path = None
        if config is not None:
            if self._dir is None:
                self._dir = self._tmp_path_factory.mktemp("forkserver")
            path = self._dir / f"server{len(self.servers)}.toml"
            path.write_text(config)
            argv += ["--config", str(path)]
        server = self.command(
            [*argv, *args],
            handler=handler,
            ready=ready,
            ready_timeout=ready_timeout,
            env=environment(self._rootdir, env or {}),
            cwd=cwd,
            stop_timeout=stop_timeout,
        )
        server.config_path = path
        return server

    def command(
        self,
        argv: Sequence[str],
        *,
        handler: str = "",
        ready: bool = True,
        ready_timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stop_timeout: float | None = None,
        **popen: Any,
    ) -> ServerProcess:
        """Start *argv*, a command that becomes a forkserver (a wrapper that
        execs it, the installed ``forkserver`` script), with exactly *env*
        (default: this process's); otherwise as :meth:`start`."""
        if stop_timeout is None:
            stop_timeout = 30.0 + SERVER_KILL_TIMEOUT + 10.0  # the server's defaults
        server = ServerProcess(
            argv, handler=handler, stop_timeout=stop_timeout, env=env, cwd=cwd, **popen
        )
        self.servers.append(server)
        if ready:
            try:
                server.wait_ready(ready_timeout)
            except process.NotReady:
                problem = server.abandon(ready_timeout)
                pytest.fail(
                    f"forkserver ({server.title}) {problem}; its log:\n"
                    + "\n".join(f"    {line}" for line in server.lines),
                    pytrace=False,
                )
        return server

    def close(self) -> str:
        """Stop every server; the failure report, or "" when all was well."""
        reports = []
        for server in self.servers:
            try:
                server.stop_checked(None)
            except Exception as exc:  # report it, and still stop the other servers
                server.problems.append(f"stopping it failed: {exc!r}")
                if server.returncode is None:  # not reaped: its group id is still its own
                    leaks.kill_everything(server.pgid, leaks.descendants(server.pid))
            if report := server.report():
                reports.append(report)
        return "\n\n".join(reports)


@pytest.fixture
def forkserver(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerFactory]:
    """Start your handler in a real forkserver: ``server = forkserver("mod:Handler", **settings)``.

    ``server.address`` ((host, port), or a Unix path), ``.host``, ``.port``,
    ``.pid``, ``.log``, ``.wait_for_log(regex)``, ``.connect()``,
    ``.children()``, ``.stop()``.  At teardown every server is stopped with
    SIGTERM; the test fails if one exits non-zero, leaves an unreaped child
    or leaves any process running (a leaked child).
    """
    factory = ServerFactory(tmp_path_factory, request.config.rootpath)
    yield factory
    if report := factory.close():
        pytest.fail(report, pytrace=False)


def _number(values: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    value = values.get(key, default)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else default
