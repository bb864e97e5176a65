"""Shared harness: start the real ``python -m forkserver`` and talk to it.

Servers start in a new session (their own process group) and are killed by
process group in teardown, so no child outlives a test.  Readiness is the
server's own "forkserver ready" log line, read from its stderr: no sleeps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Every server the suite starts checks, at each fork, that the list of fds a
# child closes is not stale (forkserver/parent/fork.py).
os.environ["FORKSERVER_CHECK_FDS"] = "1"
READY = "forkserver ready"
LISTENING = re.compile(r"listening on ([^\s\"]+)")


class ServerProcess:
    """A running forkserver parent, its log, and the addresses it reported."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.addresses: list[str] = []

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first log line (from index *start*) matching regex *pattern*."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    if rx.search(self.lines[i]):
                        return self.lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise AssertionError(
                        f"no log line matching {pattern!r} "
                        f"({'server exited' if self._eof else 'timed out'}); log:\n"
                        + "\n".join(self.lines)
                    )
                self._cond.wait(left)

    def wait_ready(self, timeout: float = 15.0) -> None:
        self.wait_for_log(READY, timeout)
        self.addresses = [m.group(1) for line in self.lines if (m := LISTENING.search(line))]

    @property
    def tcp_address(self) -> tuple[str, int]:
        """The first TCP address the server reported, as (host, port)."""
        for addr in self.addresses:
            if not addr.startswith(("unix:", "udp:")):
                host, _, port = addr.rpartition(":")
                return host.strip("[]"), int(port)
        raise AssertionError(f"no TCP listener in {self.addresses}")

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a clean exit, and return the exit status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill_group(self) -> None:
        kill_group_and_wait(self.proc)
        self._reader.join(5)
        if self.proc.stderr:
            self.proc.stderr.close()


def kill_group_and_wait(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process group *proc* leads (started in a new session),
    then reap *proc*; quiet if it is gone already."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes in process group *pgid*."""
    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Factory: ``start_server(config_text=None, *args, ready=True)``.

    *config_text* is the body of a TOML file (written to tmp_path); *args* are
    extra CLI arguments.  ``tests.services`` handlers are importable.  Every
    server started is killed by process group at teardown.
    """
    started: list[ServerProcess] = []

    def start(
        config_text: str | None = None,
        *args: str,
        ready: bool = True,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        **popen: Any,
    ) -> ServerProcess:
        argv = [sys.executable, "-m", "forkserver"]
        if config_text is not None:
            path = tmp_path / f"server{len(started)}.toml"
            path.write_text(config_text)
            argv += ["--config", str(path)]
        argv += list(args)
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        full_env.update(env or {})
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=cwd or tmp_path,
            start_new_session=True,
            **popen,
        )
        server = ServerProcess(proc)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.kill_group()
    for server in started:
        # SIGKILL is asynchronous: give the group a moment to finish dying
        # before calling anything still in it a leak.
        deadline = time.monotonic() + 5
        while (leftovers := group_members(server.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        for p in leftovers:
            p.kill()
        assert not leftovers, f"processes outlived the test: {leftovers}"


def write_module(path: Path, source: str) -> None:
    """Write a handler module, and drop its cached bytecode: a version written
    in the same second as the last, with the same size, would otherwise be
    imported from the stale .pyc (Python checks only mtime and size)."""
    path.write_text(source)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(importlib.util.cache_from_source(str(path)))


def config(handler: str = "forkserver.examples.echo:EchoHandler", **settings: Any) -> str:
    """A [server] table with port 0 on loopback plus *settings*, as TOML text."""
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "handler": handler}
    values.update(settings)
    lines = ["[server]"]
    for key, value in values.items():
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """*value* as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def echo_roundtrip(address: Any, payload: bytes, timeout: float = 20.0) -> bytes:
    """Connect, send *payload*, half-close, and read the reply to EOF."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    if isinstance(address, tuple) and ":" in address[0]:
        family = socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sender = threading.Thread(target=_send_and_half_close, args=(sock, payload))
        sender.start()
        chunks = []
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
        sender.join(timeout)
        return b"".join(chunks)


def send_and_read(sock: socket.socket, payload: bytes) -> bytes:
    """On an open connection: send *payload*, half-close, read the reply to EOF."""
    sender = threading.Thread(target=_send_and_half_close, args=(sock, payload))
    sender.start()
    try:
        return recv_to_eof(sock)
    finally:
        sender.join(10)


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(
    not _has_ipv6_loopback(), reason="no IPv6 loopback: cannot bind ::1 on this machine"
)


def _send_and_half_close(sock: socket.socket, payload: bytes) -> None:
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll *predicate* (for outcomes with no event to wait on, e.g. reaping)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


# --- generic client helpers (used by test_server.py / test_listeners.py) ---


def connect(address: Any, timeout: float = 10.0) -> socket.socket:
    """A connected client socket (TCP v4/v6 tuple or Unix path) with a timeout."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    if isinstance(address, tuple) and ":" in address[0]:
        family = socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def recv_until(sock: socket.socket, delimiter: bytes, limit: int = 1 << 16) -> bytes:
    """Read until *delimiter* has arrived; returns everything read (bounded by *limit*)."""
    data = b""
    while delimiter not in data:
        if len(data) > limit:
            raise AssertionError(f"no {delimiter!r} in the first {len(data)} bytes: {data[:80]!r}")
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"EOF before {delimiter!r}; got {data!r}")
        data += chunk
    return data


def recv_to_eof(sock: socket.socket, timeout: float = 20.0) -> bytes:
    """Read until the peer closes; each recv is bounded by the socket's timeout."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
    raise AssertionError(f"no EOF within {timeout}s")


def accept_queue_length(port: int) -> int:
    """Connections waiting in the accept queue of the TCP listener on *port*.

    For a listening socket (state 0A), the rx_queue column of
    /proc/net/tcp{,6} is the number of established connections not yet
    accepted.
    """
    return _rx_queue("tcp", port, "0A")


def udp_queued_bytes(port: int) -> int:
    """Bytes waiting in the receive queue of the UDP socket bound to *port*."""
    return _rx_queue("udp", port)


def _rx_queue(protocol: str, port: int, state: str | None = None) -> int:
    """The rx_queue column of /proc/net/PROTOCOL{,6}, summed over the sockets
    bound to local *port* (in *state*, if given)."""
    total = 0
    for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
        try:
            with open(table) as fp:
                rows = fp.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, row_state, queues = fields[1], fields[3], fields[4]
            if state is not None and row_state != state:
                continue
            if int(local.rpartition(":")[2], 16) == port:
                total += int(queues.partition(":")[2], 16)
    return total


# Lines the parent logs for a child that did not exit 0.
ABNORMAL_EXIT = re.compile(r"child \d+ for .* (exit status|killed by)")


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


def children_gone(server: ServerProcess, timeout: float = 20.0) -> None:
    """Every child reaped: none alive, none a zombie (waits for the reaping)."""
    try:
        wait_until(lambda: not server.children(), timeout, "the server's children to go")
    except AssertionError:
        zombies = [p.pid for p in zombie_children(server)]
        left = [p.pid for p in server.children()]
        raise AssertionError(f"children left: {left}, of which zombies: {zombies}") from None


def zombie_children(server: ServerProcess) -> list[psutil.Process]:
    """The server's children that have exited but were not reaped."""
    found = []
    for child in server.children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


# --- generic helpers (used by test_config.py / test_cli.py / test_handlers.py) ---


def run_forkserver(
    *args: str, cwd: Path, timeout: float = 20.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m forkserver ARGS`` to completion, for runs that must not serve.

    Same environment as ``start_server`` (``tests.*`` importable).  A run that
    wrongly starts serving is killed at *timeout* and fails the test.
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


def occupy_port() -> socket.socket:
    """A socket listening on 127.0.0.1 at a kernel-chosen port, so that port is taken.

    Use as ``with occupy_port() as sock: port = sock.getsockname()[1]``.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


# --- used by the issue 4 tests (test_admission/limits/faults/hostile.py) ---

# The two ways a connection gets its child: forked on accept, or handed to one
# of the pre-forked spares.  Settings to merge into config().
FORK_ON_ACCEPT: dict[str, Any] = {}
POOL: dict[str, Any] = {"spare_children": 2}
MODES = [pytest.param(FORK_ON_ACCEPT, id="fork"), pytest.param(POOL, id="pool")]


def child_pids(pid: int) -> set[int]:
    """The children of *pid* (zombies included), from /proc: cheap enough to
    sample in a loop, unlike psutil's children(), which scans every process."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fp:
            return {int(p) for p in fp.read().split()}
    except (FileNotFoundError, ProcessLookupError):
        return set()


def live_children(server: ServerProcess) -> set[int]:
    """Pids of the server's children that are running (not zombies)."""
    live = set()
    for pid in child_pids(server.pid):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                live.add(pid)
        except psutil.NoSuchProcess:
            continue
    return live


def idle_children(server: ServerProcess, settings: dict[str, Any], timeout: float = 20) -> set[int]:
    """Wait until the server has only its idle children (the spares in pool
    mode, none forked on accept) and return their pids."""
    want = int(settings.get("spare_children", 0))

    def settled() -> bool:  # no zombie either: every exited child was reaped
        return len(child_pids(server.pid)) == want and len(live_children(server)) == want

    wait_until(settled, timeout, f"{want} idle children and nothing else")
    return live_children(server)


def reaped(pid: int) -> bool:
    """Whether *pid* is gone for good: exited and reaped (a zombie still exists)."""
    return not psutil.pid_exists(pid)


def read_pid_greeting(sock: socket.socket) -> int:
    """The pid a PidEcho-style handler greets with (proof the client was served)."""
    return int(recv_until(sock, b"\n").split(b"\n", 1)[0])
