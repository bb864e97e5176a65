"""Timeouts and per-child limits (forkserver/child.py's ChildLimits, and
max_lifetime in forkserver/server.py), end to end.

Each test starts the real server with one setting and checks what the client
sees (EOF within a bound), what the log says and why, how the child ended, and
what the child itself reports about its limits and identity (the
``tests.helpers.services:report`` handler), in both serving modes.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers.clients import (
    connect,
    echo_roundtrip,
    read_pid_greeting,
    recv_to_eof,
    recv_until,
)
from tests.helpers.processes import idle_children, live_children, reaped
from tests.helpers.servers import (
    FORK_ON_ACCEPT,
    MODES,
    POOL,
    ServerProcess,
    StartServer,
    config,
    wait_until,
)

NOBODY = 65534  # nobody, and nogroup, on Debian


def _exited_normally(server: ServerProcess, pid: int) -> bool:
    """After the server has stopped: whether *pid*'s end went unremarked
    (the parent logs every non-zero status and every death by signal)."""
    assert server.poll() is not None, "stop the server first: the log must be complete"
    return not re.search(rf"child {pid} for .* (exit status|killed by)", server.log)


def _all_children_run_as(server: ServerProcess, uid: int, gid: int | None = None) -> None:
    """Every live child runs as *uid* (and *gid*), or will a moment after fork."""

    def settled() -> bool:
        for pid in live_children(server):
            try:
                proc = psutil.Process(pid)
                if set(proc.uids()) != {uid} or (gid is not None and set(proc.gids()) != {gid}):
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    wait_until(settled, 10, f"every child to run as uid {uid}")


def _report(address: tuple[str, int], path: str = "") -> dict[str, Any]:
    """Ask a tests.helpers.services:report child about itself."""
    with connect(address) as sock:
        sock.sendall(path.encode() + b"\n")
        facts: dict[str, Any] = json.loads(recv_to_eof(sock))
    return facts


# -- idle_timeout -------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout_disconnects_a_silent_client_and_the_child_exits_0(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(config("tests.helpers.services:pid_then_echo", idle_timeout=1, **mode))
    idle_children(server, mode)
    address = server.tcp_address
    with connect(address, timeout=10) as silent:
        port = silent.getsockname()[1]
        pid = read_pid_greeting(silent)
        # Meanwhile other clients are served as usual.
        for i in range(3):
            payload = f"other client {i}\n".encode() * 100
            greeting, _, echoed = echo_roundtrip(address, payload).partition(b"\n")
            assert greeting.isdigit() and echoed == payload
        assert recv_to_eof(silent, timeout=10) == b""  # closed by the server
    line = server.wait_for_log(rf"closing the connection from 127\.0\.0\.1:{port}: ")
    assert line.endswith("idle_timeout (1s) expired: the client sent nothing"), line
    assert f"[{pid}]" in line, "logged by the child itself"
    wait_until(lambda: reaped(pid), 10, "the child to be reaped")
    assert server.stop() == 0
    assert _exited_normally(server, pid), server.log


@pytest.mark.timeout(60)
def test_idle_timeout_is_not_taken_for_eof_by_a_stream_handler(
    start_server: StartServer,
) -> None:
    server = start_server(config("tests.helpers.services:ReadTen", idle_timeout=1))
    with connect(server.tcp_address, timeout=10) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"12345")  # half of what the handler waits for, then silence
        reply = recv_to_eof(sock, timeout=10)
    assert reply == b"", "the handler went on with a truncated request"
    line = server.wait_for_log(rf"closing the connection from 127\.0\.0\.1:{port}: ")
    assert line.endswith("idle_timeout (1s) expired: the client sent nothing"), line
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_idle_timeout_bounds_each_wait_not_the_connection(start_server: StartServer) -> None:
    # A client that keeps talking is served for longer than idle_timeout.
    idle = 2.0
    server = start_server(config("tests.helpers.services:PidEcho", idle_timeout=idle))
    with connect(server.tcp_address, timeout=10) as sock:
        pid = read_pid_greeting(sock)
        started = time.monotonic()
        lines = 0
        while time.monotonic() - started < 1.5 * idle:
            line = f"line {lines}\n".encode()
            sock.sendall(line)
            assert recv_until(sock, b"\n") == line
            lines += 1
            time.sleep(0.2)  # well under idle_timeout between messages
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b""
    assert lines > 5
    wait_until(lambda: reaped(pid), 10, "the child to be reaped")
    assert server.stop() == 0
    assert "idle_timeout" not in server.log
    assert _exited_normally(server, pid), server.log


# -- send_timeout ----------------------------------------------------------------------


def _non_reader(address: tuple[str, int]) -> socket.socket:
    """A client with a small receive buffer that will never read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "timeouts"),
    [
        pytest.param(FORK_ON_ACCEPT, {"send_timeout": 1}, id="fork"),
        # With no send_timeout, idle_timeout bounds sends too.
        pytest.param(POOL, {"idle_timeout": 1}, id="pool-idle_timeout"),
    ],
)
def test_send_timeout_disconnects_a_client_that_never_reads(
    start_server: StartServer, mode: dict[str, Any], timeouts: dict[str, float]
) -> None:
    server = start_server(config("tests.helpers.services:write_64_mib", **timeouts, **mode))
    idle_children(server, mode)
    with _non_reader(server.tcp_address) as sock:
        port = sock.getsockname()[1]
        pid = read_pid_greeting(sock)
        line = server.wait_for_log(rf"closing the connection from 127\.0\.0\.1:{port}: ", 30)
        assert line.endswith("send_timeout (1s) expired: the client is not reading"), line
        assert f"[{pid}]" in line
        wait_until(lambda: reaped(pid), 10, "the child to be reaped")
    with connect(server.tcp_address) as other:  # the next client is served
        assert read_pid_greeting(other) != pid
    assert server.stop() == 0
    assert _exited_normally(server, pid), server.log


# -- max_lifetime ------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_max_lifetime_terminates_a_child_that_never_ends(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(config("tests.helpers.services:greet_then_sleep", max_lifetime=1, **mode))
    idle_children(server, mode)
    with connect(server.tcp_address, timeout=10) as sock:
        port = sock.getsockname()[1]
        pid = read_pid_greeting(sock)
        assert recv_to_eof(sock, timeout=20) == b""
    peer = rf"child {pid} for 127\.0\.0\.1:{port}"
    over = server.wait_for_log(rf"{peer} exceeded max_lifetime \(1s\): SIGTERM$")
    assert f"[{server.pid}]" in over, "the parent enforces it"
    server.wait_for_log(rf"{peer} killed by SIGTERM after")
    assert "SIGKILL" not in server.log
    wait_until(lambda: reaped(pid), 10, "the child to be reaped")
    assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_max_lifetime_kills_a_child_that_ignores_sigterm(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(
        config("tests.helpers.services:IgnoreTerm", max_lifetime=1, kill_timeout=0.5, **mode)
    )
    idle_children(server, mode)
    with connect(server.tcp_address, timeout=10) as sock:
        port = sock.getsockname()[1]
        assert recv_until(sock, b"\n") == b"ready\n"  # SIGTERM is ignored from here on
        peer = rf"child (\d+) for 127\.0\.0\.1:{port}"
        term = server.wait_for_log(rf"{peer} exceeded max_lifetime \(1s\): SIGTERM$", 20)
        pid = int(re.findall(peer, term)[0])
        server.wait_for_log(rf"child {pid} for \S+ exceeded max_lifetime \(1s\): SIGKILL$", 20)
        server.wait_for_log(rf"child {pid} for \S+ killed by SIGKILL after", 20)
        assert recv_to_eof(sock, timeout=10) == b""
    wait_until(lambda: reaped(pid), 10, "the child to be reaped")
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_max_lifetime_spares_the_connections_that_end_in_time(start_server: StartServer) -> None:
    server = start_server(config(max_lifetime=30))
    for i in range(20):
        payload = os.urandom(1000 + i)
        assert echo_roundtrip(server.tcp_address, payload) == payload
    assert server.stop() == 0
    assert "max_lifetime" not in server.log


# -- rlimits, user, group, umask ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_each_child_gets_the_configured_rlimits(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(
        config(
            "tests.helpers.services:report",
            limit_open_files=16,
            limit_core_mb=0,
            limit_memory_mb=256,
            limit_cpu=30,
            **mode,
        )
    )
    idle_children(server, mode)
    for _ in range(2):
        facts = _report(server.tcp_address)
        assert facts["nofile"] == [16, 16]
        assert facts["core"] == [0, 0]
        assert facts["as"] == [256 << 20, 256 << 20]
        assert facts["cpu"] == [30, 31]  # SIGXCPU at 30 s, SIGKILL at 31
    # The parent keeps its own.
    parent = psutil.Process(server.pid)
    assert parent.rlimit(psutil.RLIMIT_NOFILE) != (16, 16)
    assert parent.rlimit(psutil.RLIMIT_CPU) != (30, 30)
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_rlimits_are_inherited_when_not_configured(start_server: StartServer) -> None:
    server = start_server(config("tests.helpers.services:report"))
    facts = _report(server.tcp_address)
    parent = psutil.Process(server.pid)
    for name, kind in (("nofile", psutil.RLIMIT_NOFILE), ("core", psutil.RLIMIT_CORE)):
        assert tuple(facts[name]) == parent.rlimit(kind), name
    assert server.stop() == 0


@pytest.mark.timeout(90)
def test_limit_cpu_kills_a_spinning_child(start_server: StartServer) -> None:
    server = start_server(config("tests.helpers.services:burn_cpu", limit_cpu=1, limit_core_mb=0))
    with connect(server.tcp_address, timeout=10) as sock:
        port = sock.getsockname()[1]
        pid = read_pid_greeting(sock)
        # One CPU second; on a busy machine that can take many wall seconds.
        line = server.wait_for_log(rf"child {pid} for 127\.0\.0\.1:{port} killed by ", 80)
        assert re.search(r"killed by SIGXCPU after", line), line
        assert recv_to_eof(sock) == b""
    assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_limit_memory_fails_a_large_allocation_and_allows_a_small_one(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(config("tests.helpers.services:allocate", limit_memory_mb=96, **mode))
    idle_children(server, mode)
    with connect(server.tcp_address) as sock:
        sock.sendall(b"16\n")
        assert recv_to_eof(sock) == b"ok 16\n"
    with connect(server.tcp_address) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"512\n")
        assert recv_to_eof(sock) == b""  # no "ok": the allocation failed
    line = server.wait_for_log(rf"child \d+ for 127\.0\.0\.1:{port} (exit status|killed by)")
    assert line.split(f"127.0.0.1:{port} ")[1].startswith("exit status 1 after"), line
    server.wait_for_log(rf"handler failed for 127\.0\.0\.1:{port}$")
    server.wait_for_log(r"^MemoryError")
    assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("group", "gid"), [("", NOBODY), ("nogroup", NOBODY), ("users", 100)])
def test_user_and_group_drop_root_in_every_child(
    start_server: StartServer, mode: dict[str, Any], group: str, gid: int
) -> None:
    server = start_server(
        config("tests.helpers.services:report", user="nobody", group=group, **mode)
    )
    idle_children(server, mode)
    _all_children_run_as(server, NOBODY, gid)  # spares drop root before any connection
    facts = _report(server.tcp_address)
    assert facts["resuid"] == [NOBODY, NOBODY, NOBODY], "real, effective and saved uid"
    assert facts["resgid"] == [gid, gid, gid]
    assert facts["groups"] == [gid], "no supplementary group of root's left"
    # The parent stays root: it bound the port and forks the next children.
    assert psutil.Process(server.pid).uids().real == 0
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_group_alone_changes_only_the_group(start_server: StartServer) -> None:
    server = start_server(config("tests.helpers.services:report", group="users"))
    facts = _report(server.tcp_address)
    assert facts["resuid"] == [0, 0, 0]
    assert facts["resgid"] == [100, 100, 100]
    assert facts["groups"] == [100]
    assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_umask_applies_to_files_the_handler_creates(
    start_server: StartServer, mode: dict[str, Any], tmp_path: Path
) -> None:
    server = start_server(config("tests.helpers.services:report", umask=0o027, **mode))
    idle_children(server, mode)
    facts = _report(server.tcp_address, str(tmp_path / "created-by-the-child"))
    assert facts["umask"] == 0o027
    assert facts["mode"] == 0o640  # 0o666 asked, 0o027 masked
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_limits_apply_to_every_child_under_concurrency(start_server: StartServer) -> None:
    # Several children at once, each must report the same limits and identity.
    server = start_server(
        config(
            "tests.helpers.services:report", user="nobody", limit_open_files=32, spare_children=2
        )
    )
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            results.append(_report(server.tcp_address))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len({r["pid"] for r in results}) == 12, "one child per connection"
    for facts in results:
        assert facts["resuid"] == [NOBODY, NOBODY, NOBODY]
        assert facts["nofile"] == [32, 32]
    _all_children_run_as(server, NOBODY)
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_max_lifetime_always_sends_sigterm_first(start_server: StartServer) -> None:
    # Fractional lifetimes once lost the SIGTERM to float rounding.
    server = start_server(config("tests.helpers.services:greet_then_sleep", max_lifetime=0.3))
    socks = [connect(server.tcp_address) for _ in range(4)]
    for sock in socks:
        recv_until(sock, b"\n")
    for sock in socks:
        assert recv_to_eof(sock) == b""
        sock.close()
    wait_until(lambda: server.log.count("killed by SIGTERM") == 4, 20, "four SIGTERMed children")
    assert "exceeded max_lifetime (0.3s): SIGKILL" not in server.log
    assert server.stop() == 0
