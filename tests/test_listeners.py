"""End-to-end tests of the listeners (forkserver/listeners.py) through the real CLI:
IPv6, dual-stack, Unix sockets and their files, mixed listeners, the backlog cap.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path

import psutil
import pytest

from tests.helpers.clients import connect, echo_roundtrip, needs_ipv6, recv_to_eof, recv_until
from tests.helpers.servers import StartServer, config


def _unix_address(addresses: list[str]) -> str:
    [path] = [a.removeprefix("unix:") for a in addresses if a.startswith("unix:")]
    return path


def _stale_socket_file(path: Path) -> None:
    """Leave a socket file behind the way a killed server does: bound, closed, not unlinked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


# -- TCP ----------------------------------------------------------------------------


@needs_ipv6
@pytest.mark.timeout(30)
def test_ipv6_loopback_listener(start_server: StartServer) -> None:
    server = start_server(config(host=["::1"]))
    [address] = server.listening
    assert re.fullmatch(r"\[::1\]:\d+", address), address
    host, port = server.tcp_address
    assert (host, port) == ("::1", int(address.rpartition(":")[2]))
    payload = os.urandom(100_000)
    assert echo_roundtrip((host, port), payload) == payload
    with pytest.raises(ConnectionRefusedError):  # IPv6 only: no IPv4 listener on that port
        connect(("127.0.0.1", port), timeout=5).close()
    assert server.stop() == 0


@needs_ipv6
@pytest.mark.timeout(30)
def test_dual_stack_wildcard_accepts_ipv4_and_ipv6(start_server: StartServer) -> None:
    server = start_server(config(host=["::"]))
    [address] = server.listening
    assert re.fullmatch(r"\[::\]:\d+", address), address
    _, port = server.tcp_address
    for host in ("127.0.0.1", "::1"):
        payload = host.encode() + os.urandom(1000)
        assert echo_roundtrip((host, port), payload) == payload, host
    assert server.stop() == 0


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        pytest.skip("net.core.somaxconn is not readable on this machine")


@pytest.mark.timeout(30)
def test_backlog_above_somaxconn_is_warned_about(start_server: StartServer) -> None:
    cap = _somaxconn()
    server = start_server(config(backlog=cap + 1))
    server.wait_for_log(
        rf"backlog {cap + 1} exceeds net\.core\.somaxconn={cap}: "
        rf"the kernel silently caps it at {cap}"
    )
    assert echo_roundtrip(server.tcp_address, b"capped") == b"capped"
    assert server.stop() == 0


@pytest.mark.timeout(30)
def test_backlog_within_somaxconn_is_not_warned_about(start_server: StartServer) -> None:
    server = start_server(config(backlog=_somaxconn()))
    assert "somaxconn" not in server.log
    assert server.stop() == 0


# -- Unix-domain sockets ----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_unix_listener_serves_with_mode_and_is_removed_on_stop(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    server = start_server(config(host=[], unix=str(path), unix_mode=0o600))
    assert server.listening == [f"unix:{path}"]
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    payload = os.urandom(200_000)
    assert echo_roundtrip(str(path), payload) == payload
    assert server.stop() == 0
    assert not path.exists(), "the socket file outlived a clean stop"


@pytest.mark.timeout(30)
def test_stale_unix_socket_file_is_replaced(start_server: StartServer, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    _stale_socket_file(path)
    server = start_server(config(host=[], unix=str(path)))
    server.wait_for_log(rf"removing stale socket file {re.escape(str(path))}$")
    assert echo_roundtrip(str(path), b"fresh") == b"fresh"
    assert server.stop() == 0
    assert not path.exists()


@pytest.mark.timeout(30)
def test_unix_path_of_a_live_server_is_not_stolen(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    first = start_server(config(host=[], unix=str(path)))
    inode = os.lstat(path).st_ino
    second = start_server(config(host=[], unix=str(path)), ready=False)
    assert second.wait(15) == 1
    second.wait_for_log(rf"cannot listen on unix:{re.escape(str(path))}: a live server is using it")
    assert "forkserver ready" not in second.log
    # The first server keeps its file and goes on serving.
    assert os.lstat(path).st_ino == inode
    assert echo_roundtrip(str(path), b"still mine") == b"still mine"
    assert first.stop() == 0
    assert not path.exists()


@pytest.mark.timeout(30)
def test_regular_file_at_the_unix_path_is_refused(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    path.write_text("precious data\n")
    server = start_server(config(host=[], unix=str(path)), ready=False)
    assert server.wait(15) == 1
    server.wait_for_log(
        rf"cannot listen on unix:{re.escape(str(path))}: file exists and is not a socket"
    )
    assert path.read_text() == "precious data\n"


@pytest.mark.timeout(30)
def test_tcp_and_unix_listeners_in_one_config_both_serve(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    server = start_server(config(host=["127.0.0.1"], unix=str(path)))
    assert len(server.listening) == 2, server.listening
    assert _unix_address(server.listening) == str(path)
    for address in (server.tcp_address, str(path)):
        payload = os.urandom(70_000)
        assert echo_roundtrip(address, payload) == payload, address
    # Both at once: a connection held on one does not block the other.
    with connect(str(path)) as held:
        held.sendall(b"held")
        assert echo_roundtrip(server.tcp_address, b"tcp") == b"tcp"
        held.shutdown(socket.SHUT_WR)
        assert recv_to_eof(held) == b"held"
    assert server.stop() == 0
    assert not path.exists()


@pytest.mark.timeout(60)
def test_reuse_port_lets_two_servers_share_a_port(start_server: StartServer) -> None:
    first = start_server(config("tests.helpers.services:PidEcho", reuse_port=True))
    port = first.tcp_address[1]
    second = start_server(config("tests.helpers.services:PidEcho", reuse_port=True, port=port))
    assert second.tcp_address == first.tcp_address
    parents: set[int] = set()
    for _ in range(200):  # the kernel hashes each connection to one of them
        with connect(first.tcp_address) as sock:
            child = psutil.Process(int(recv_until(sock, b"\n")))
            parents.add(child.ppid())
        if parents == {first.pid, second.pid}:
            break
    assert parents == {first.pid, second.pid}
    assert first.stop() == 0
    # The other one goes on serving the port alone.
    with connect(second.tcp_address) as sock:
        recv_until(sock, b"\n")
    assert second.stop() == 0
