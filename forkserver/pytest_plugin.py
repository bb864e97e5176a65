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

import json
import math
import os
import re
import select
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

__all__ = ["ServerFactory", "ServerProcess", "forkserver"]

READY = re.compile(r"forkserver ready")
LISTENING = re.compile(r"listening on (\S+)")
DEFAULT_GRACEFUL_TIMEOUT = 5.0  # a failed test may still hold a connection open
SERVER_KILL_TIMEOUT = 5.0  # the server's own default kill_timeout
ZOMBIE_GRACE = 2.0  # a child may exit just as we look: the server has this long to reap it
LEAK_GRACE = 1.0  # a process still running this long after the server exited is a leak
LOG_TAIL = 25
# Variables meant for the process running the tests, not for a server it starts:
# with NOTIFY_SOCKET, systemd would take the test server for the service.
NOT_INHERITED = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "FORKSERVER_BOOT")

Address = tuple[str, int] | str


class ServerProcess:
    """A forkserver started by the ``forkserver`` fixture.

    ``address`` is the first listener the server reported: ``(host, port)``
    for TCP, the path for a Unix socket; ``addresses`` lists them all.
    """

    def __init__(self, proc: subprocess.Popen[str], handler: str, stop_timeout: float) -> None:
        self.pid = proc.pid
        self.handler = handler
        self.addresses: list[Address] = []
        self._proc = proc
        self._stop_timeout = stop_timeout
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._status: int | None = None
        self._stopped_by_user = False
        self._reported = False  # its problems were already reported (a failed start)
        self._problems: list[str] = []
        self._reader = threading.Thread(target=self._read, name=f"forkserver-{self.pid}-log")
        self._reader.daemon = True
        self._reader.start()

    def __repr__(self) -> str:
        return f"<forkserver pid {self.pid} {self.handler} at {self.addresses}>"

    # -- what a test uses --------------------------------------------------------

    @property
    def address(self) -> Address:
        if not self.addresses:
            raise AssertionError(f"forkserver pid {self.pid} reported no listener")
        return self.addresses[0]

    @property
    def host(self) -> str:
        return self._tcp()[0]

    @property
    def port(self) -> int:
        return self._tcp()[1]

    @property
    def log(self) -> str:
        """Everything the server (and its children) wrote to stderr and stdout so far."""
        with self._cond:
            return "\n".join(self._lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """The first log line matching regex *pattern*, waiting up to *timeout* seconds."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self._lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "the server's output ended" if self._eof else f"{timeout:g} s passed"
                    raise AssertionError(
                        f"no log line matching {pattern!r} ({why}); log:\n" + self.log
                    )
                self._cond.wait(left)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A client socket connected to :attr:`address`, with *timeout* on every call."""
        address = self.address
        if isinstance(address, str):
            family = socket.AF_UNIX
        else:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock

    def children(self) -> list[psutil.Process]:
        """The server's children now: one per connection being served, plus spares."""
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, wait for the exit, and return the exit status (-N: killed by signal N).

        The status is then yours to check; leaked processes still fail the test
        at teardown.  A server that does not exit within *timeout* is killed.
        """
        self._stopped_by_user = True
        return self._stop(timeout)

    # -- internals ---------------------------------------------------------------

    def _tcp(self) -> tuple[str, int]:
        for address in self.addresses:
            if isinstance(address, tuple):
                return address
        raise AssertionError(f"forkserver pid {self.pid} has no TCP listener: {self.addresses}")

    def _read(self) -> None:
        stream = self._proc.stdout
        assert stream is not None
        for line in stream:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _wait_ready(self, timeout: float) -> bool:
        """Wait for "forkserver ready" and read the addresses; False if it never came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                messages = [m for line in self._lines for m in _messages(line)]
                if any(READY.search(m) for m in messages):
                    found = (LISTENING.search(m) for m in messages)
                    self.addresses = [_parse_address(m.group(1)) for m in found if m]
                    return True
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    return False
                self._cond.wait(left)

    def _wait_exit(self, timeout: float) -> bool:
        """Whether the server exited within *timeout*, without reaping it: while it
        is unreaped its pid, and so its process group's id, cannot be reused."""
        if self._proc.returncode is not None:
            return True
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # no pidfd (Linux < 5.3): poll
            deadline = time.monotonic() + timeout
            while not self._exited():
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
            return True
        try:
            return bool(select.select([pidfd], [], [], max(timeout, 0.0))[0])
        finally:
            os.close(pidfd)

    def _exited(self) -> bool:
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, self.pid, flags) is not None
        except ChildProcessError:  # reaped by someone else's waitpid(-1)
            return True

    def _stop(self, timeout: float | None) -> int:
        if self._status is not None:
            return self._status
        timeout = self._stop_timeout if timeout is None else timeout
        running_before = not self._wait_exit(0)
        descendants: list[psutil.Process] = []
        exited = True
        if running_before:
            self._check_zombies()
            descendants = _descendants(self.pid)
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # exited just now; its status says how
            exited = self._wait_exit(timeout)
        if exited:
            leftovers = self._leftovers(descendants)
            if leftovers:
                self._problems.append(
                    f"{len(leftovers)} process(es) it started were still running after it "
                    "exited (leaked by the handler? whatever a child forks must exit with "
                    f"it):\n{_describe(leftovers)}"
                )
        else:
            leftovers = _descendants(self.pid)
            self._problems.append(
                f"it did not exit within {timeout:g} s of SIGTERM; its processes then:\n"
                + (_describe(leftovers) or "    (none)")
            )
        self._kill_everything(leftovers)
        status = self._status = self._proc.wait()
        if status != 0 and not self._stopped_by_user:
            when = "after SIGTERM" if running_before else "during the test"
            self._problems.append(f"it exited {when} with {_status_text(status)} (expected 0)")
        self._reader.join(2.0)
        return status

    def _check_zombies(self) -> None:
        """Children that stay zombies: exited, and the server does not reap them."""
        zombies = [p for p in self.children() if _status(p) == psutil.STATUS_ZOMBIE]
        deadline = time.monotonic() + ZOMBIE_GRACE
        while zombies and time.monotonic() < deadline:
            time.sleep(0.02)
            zombies = [p for p in zombies if _status(p) == psutil.STATUS_ZOMBIE]
        if zombies:
            self._problems.append(
                f"{len(zombies)} child(ren) exited but were not reaped within "
                f"{ZOMBIE_GRACE:g} s (zombies): {', '.join(str(p.pid) for p in zombies)}"
            )

    def _leftovers(self, descendants: Sequence[psutil.Process]) -> list[psutil.Process]:
        """Live processes of the server's session or process group, or among its
        *descendants* before the stop, once it has exited (and is not yet reaped)."""
        deadline = time.monotonic() + LEAK_GRACE
        while True:
            found = {p.pid: p for p in descendants if _alive(p)}
            for pid in psutil.pids():
                try:
                    if self.pid in (os.getpgid(pid), os.getsid(pid)) and pid != self.pid:
                        process = psutil.Process(pid)
                        if _alive(process):
                            found[pid] = process
                except (OSError, psutil.Error):
                    continue  # gone meanwhile
            if not found or time.monotonic() >= deadline:
                return sorted(found.values(), key=lambda p: p.pid)
            time.sleep(0.02)

    def _kill_everything(self, leftovers: Sequence[psutil.Process]) -> None:
        """SIGKILL the process group, the server and each leftover (some may have
        left the group), and wait for them to go."""
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the server leads its group: it too
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group (a zombie leader does not count)
        for process in leftovers:
            try:
                process.kill()
            except psutil.Error:
                pass  # gone already
        # Dead once a zombie: reaping is for their parent (init, for orphans).
        deadline = time.monotonic() + 5.0
        while any(_alive(p) for p in leftovers) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _abandon(self, timeout: float) -> str:
        """Kill a server that did not get ready, and everything it started; why."""
        # Its output ended: it is exiting (with a one-line error, most likely).
        exited = self._eof and self._wait_exit(5.0)
        self._reported = True  # the failure is reported now, not at teardown
        self._kill_everything(_descendants(self.pid))
        self._status = self._proc.wait()
        self._reader.join(2.0)
        if exited:
            return f"exited with {_status_text(self._status)} before it was ready"
        return f"was not ready within {timeout:g} s"

    def _report(self) -> str:
        """The teardown failure for this server, or "" when all was well."""
        if self._reported or not self._problems:
            return ""
        with self._cond:
            tail = self._lines[-LOG_TAIL:]
        return (
            f"forkserver pid {self.pid} (handler {self.handler}) did not stop cleanly:\n"
            + "".join(f"- {problem}\n" for problem in self._problems)
            + "Anything it left running was killed. "
            + f"Last {len(tail)} lines of its log:\n"
            + "\n".join(f"    {line}" for line in tail)
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
        name = _handler_name(handler)
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
        if self._dir is None:
            self._dir = self._tmp_path_factory.mktemp("forkserver")
        config = self._dir / f"server{len(self.servers)}.toml"
        config.write_text(_toml_table("server", values))
        stop_timeout = (
            _number(values, "graceful_timeout")
            + _number(values, "kill_timeout", SERVER_KILL_TIMEOUT)
            + 10.0
        )
        server = _spawn(
            [sys.executable, "-m", "forkserver", "--config", str(config)],
            handler=name,
            env=_environment(self._rootdir, env or {}),
            stop_timeout=stop_timeout,
        )
        self.servers.append(server)
        if not server._wait_ready(ready_timeout):
            problem = server._abandon(ready_timeout)
            pytest.fail(
                f"forkserver (handler {name}) {problem}; its log:\n"
                + "\n".join(f"    {line}" for line in server._lines),
                pytrace=False,
            )
        return server

    def _close(self) -> str:
        """Stop every server; the failure report, or "" when all was well."""
        reports = []
        for server in self.servers:
            try:
                server._stop(None)
            except Exception as exc:  # report it, and still stop the other servers
                server._problems.append(f"stopping it failed: {exc!r}")
                if server._status is None:  # not reaped: its group id is still its own
                    server._kill_everything(_descendants(server.pid))
            if report := server._report():
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
    if report := factory._close():
        pytest.fail(report, pytrace=False)


# -- helpers ---------------------------------------------------------------------


def _spawn(
    argv: Sequence[str], *, handler: str, env: Mapping[str, str], stop_timeout: float
) -> ServerProcess:
    """Start *argv* in a new session, its stdout and stderr read into its log."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env),
        text=True,
        encoding="utf-8",
        errors="backslashreplace",
        start_new_session=True,
    )
    return ServerProcess(proc, handler, stop_timeout)


def _handler_name(handler: object) -> str:
    if isinstance(handler, str):
        return handler
    module = getattr(handler, "__module__", None)
    qualname = getattr(handler, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<locals>" in qualname:
        raise TypeError(
            f"forkserver fixture: cannot name {handler!r} as 'module:attr'; "
            "define it at the top level of an importable module, or pass the string"
        )
    return f"{module}:{qualname}"


def _environment(rootdir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment, with an import path that finds what this
    test can import."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env["PYTHONPATH"] = os.pathsep.join(_import_path(rootdir))
    env.setdefault("PYTHONUNBUFFERED", "1")  # a child's print() is in the log at once
    env.update(extra)
    return env


def _import_path(rootdir: Path) -> list[str]:
    """sys.path minus what every interpreter has anyway (the standard library and
    site-packages, which must stay after it), then the rootdir, then PYTHONPATH."""
    interpreter = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        interpreter.add(os.path.realpath(sysconfig.get_paths()[key]))
    interpreter.update(os.path.realpath(p) for p in getattr(site, "getsitepackages", list)())
    interpreter.add(os.path.realpath(site.getusersitepackages()))

    def ours(path: str) -> bool:
        real = os.path.realpath(path)
        return os.path.isdir(real) and not any(
            real == top or real.startswith(top + os.sep) for top in interpreter
        )

    entries: list[str] = []
    for path in [os.path.abspath(p or os.curdir) for p in sys.path if ours(p or os.curdir)]:
        if path not in entries:
            entries.append(path)
    for path in [str(rootdir), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]:
        if path and os.path.abspath(path) not in entries:
            entries.append(os.path.abspath(path))
    return entries


def _number(values: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    value = values.get(key, default)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else default


def _toml_table(name: str, values: Mapping[str, Any]) -> str:
    lines = [f"[{name}]"]
    lines += [f"{key} = {_toml_value(key, value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if isinstance(text, str):
            return '"' + "".join(_toml_char(c) for c in text) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(key, v) for v in value) + "]"
    raise TypeError(
        f"forkserver fixture: {key}={value!r} is not a setting value "
        "(a string, path, number, boolean, or a list of them)"
    )


def _toml_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c


def _messages(line: str) -> list[str]:
    """The texts of a log line to match: the line, or if it is a JSON record
    (``log_format = "json"``), its string values."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return [line]
        if isinstance(record, dict):
            return [v for v in record.values() if isinstance(v, str)]
    return [line]


def _parse_address(text: str) -> Address:
    """An address as the server logs it: HOST:PORT, [V6]:PORT or unix:PATH."""
    if text.startswith("unix:"):
        return text[len("unix:") :]
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _status(process: psutil.Process) -> str | None:
    try:
        return str(process.status())
    except psutil.NoSuchProcess:
        return None


def _alive(process: psutil.Process) -> bool:
    status = _status(process)
    return status is not None and status != psutil.STATUS_ZOMBIE


def _describe(processes: Sequence[psutil.Process]) -> str:
    rows = []
    for process in processes:
        try:
            command = " ".join(process.cmdline()) or f"[{process.name()}]"
            parent = process.ppid()
        except psutil.Error:
            command, parent = "(gone)", 0
        rows.append(f"    pid {process.pid} (parent {parent}): {command}")
    return "\n".join(rows)


def _status_text(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"
