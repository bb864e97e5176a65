"""Spares that accept their connection themselves (pool.py, "direct" listeners).

With spare_children and no admission rule, idle spares wait on the listener
and the kernel gives each connection to one of them: the parent is off the
connection's path.  Freezing the parent with SIGSTOP shows it: idle spares
still serve.  Where the parent must look at a connection first (admission
rules, the PROXY protocol), it still accepts and hands over.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    ServerProcess,
    StartServer,
    config,
    connect,
    idle_children,
    reaped,
    recv_to_eof,
    recv_until,
    wait_until,
    zombie_children,
)
from tests.test_metrics_server import _metrics_url, _scrape
from tests.test_transports import PROXY_REPORT, listen, server_table, tcp_at, unix_at, v1

REPORT_FDS = "tests.services:report_fds"


@contextmanager
def frozen(server: ServerProcess) -> Iterator[None]:
    """The parent stopped (SIGSTOP) for the block: it accepts, reads and forks nothing."""
    server.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.signal(signal.SIGCONT)


def _report(address: tuple[str, int] | str) -> dict[str, Any]:
    with connect(address) as sock:
        reply: dict[str, Any] = json.loads(recv_until(sock, b"\n"))
        return reply


def _nothing_of_the_parents(fds: dict[str, str]) -> bool:
    """Whether a child holds nothing of the parent's: no listener, no handoff
    socket, no busy pipe; at most its siblings' pidfds, which are close-on-exec
    and grant nothing a pid does not (parent/children.py)."""
    return all(target == "anon_inode:[pidfd]" for target in fds.values())


def _spares(server: ServerProcess, count: int) -> set[int]:
    """The pids of *count* idle spares, once there are only those."""
    return idle_children(server, {"spare_children": count})


@pytest.mark.timeout(60)
def test_idle_spares_serve_while_the_parent_is_stopped(start_server: StartServer) -> None:
    server = start_server(config(REPORT_FDS, spare_children=3))
    spares = _spares(server, 3)
    with frozen(server):
        replies = [_report(server.tcp_address) for _ in range(3)]
    # Each connection went to its own pre-forked spare, which let go of the
    # listener (and everything else of the parent's) before the handler ran.
    assert {r["pid"] for r in replies} == spares
    for reply in replies:
        assert _nothing_of_the_parents(reply["fds"]), reply
        assert reply["addr"][0] == "127.0.0.1"
    # Thawed, the parent reads the spares' busy records, reaps them, refills.
    wait_until(lambda: all(reaped(pid) for pid in spares), what="the used spares reaped")
    assert not _spares(server, 3) & spares
    assert _nothing_of_the_parents(_report(server.tcp_address)["fds"])
    assert server.stop() == 0
    assert "exit status" not in server.log  # every child exited 0
    assert not zombie_children(server)


@pytest.mark.timeout(60)
def test_a_spare_accepts_from_a_unix_listener_too(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = str(tmp_path / "direct.sock")
    body = server_table(handler=REPORT_FDS, spare_children=2) + listen(unix=path)
    server = start_server(body)
    spares = _spares(server, 2)
    with frozen(server):
        reply = _report(unix_at(server, 0))
    assert reply["pid"] in spares
    assert _nothing_of_the_parents(reply["fds"]), reply
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_direct_accepts_are_counted_and_their_child_listed_with_its_client(
    start_server: StartServer,
) -> None:
    server = start_server(config("tests.services:PidEcho", spare_children=2, metrics="127.0.0.1:0"))
    base = _metrics_url(server)
    _spares(server, 2)
    for _ in range(3):
        with connect(server.tcp_address) as sock:
            recv_until(sock, b"\n")
    held = connect(server.tcp_address)
    pid = int(recv_until(held, b"\n"))
    wait_until(lambda: _scrape(base)[("forkserver_children", (("state", "busy"),))] == 1)
    m = _scrape(base)
    assert m[("forkserver_connections_accepted_total", ())] == 4
    with urllib_get(f"{base}/children") as listed:
        children = {c["pid"]: c for c in listed["children"]}
    assert children[pid]["peer"] == f"127.0.0.1:{held.getsockname()[1]}"
    held.close()
    assert server.stop() == 0


@contextmanager
def urllib_get(url: str) -> Iterator[dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as reply:
        yield json.loads(reply.read())


@pytest.mark.timeout(60)
def test_with_an_admission_rule_the_parent_still_accepts(start_server: StartServer) -> None:
    server = start_server(config("tests.services:PidEcho", spare_children=2, allow=["127.0.0.0/8"]))
    _spares(server, 2)
    with frozen(server):
        sock = connect(server.tcp_address)
        sock.settimeout(0.5)
        # Nobody but the (stopped) parent may accept: the client waits.
        with pytest.raises(TimeoutError):
            sock.recv(100)
    sock.settimeout(10)
    recv_until(sock, b"\n")
    sock.sendall(b"admitted\n")
    assert recv_until(sock, b"\n") == b"admitted\n"
    sock.close()
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_proxy_listener_is_handed_over_beside_a_direct_one(start_server: StartServer) -> None:
    body = (
        server_table(handler=REPORT_FDS, spare_children=2)
        + listen(tcp="127.0.0.1:0")
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True)
    )
    server = start_server(body)
    spares = _spares(server, 2)
    with frozen(server):
        assert _report(tcp_at(server, 0))["pid"] in spares
        proxied = connect(tcp_at(server, 1))
        proxied.sendall(v1("203.0.113.9", 4711) + b"after the header")
        proxied.shutdown(socket.SHUT_WR)
        proxied.settimeout(0.5)
        with pytest.raises(TimeoutError):  # its header is the parent's to read
            proxied.recv(100)
    proxied.settimeout(10)
    assert recv_to_eof(proxied) == b"203.0.113.9 4711\nafter the header"
    proxied.close()
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_at_max_children_the_parent_refuses_when_no_spare_is_idle(
    start_server: StartServer,
) -> None:
    server = start_server(
        config(
            "tests.services:PidEcho",
            spare_children=1,
            max_children=1,
            when_full="refuse",
            busy_message="busy\n",
        )
    )
    _spares(server, 1)
    held = connect(server.tcp_address)
    recv_until(held, b"\n")  # the only child there may be
    with connect(server.tcp_address) as refused:
        assert recv_to_eof(refused) == b"busy\n"
    held.close()
    # The slot is free again: a new spare takes the next client.
    _spares(server, 1)
    with connect(server.tcp_address) as sock:
        recv_until(sock, b"\n")
    assert server.stop() == 0
    assert "refused 127.0.0.1" in server.log


@pytest.mark.timeout(60)
def test_stop_with_idle_spares_on_a_listener_loses_nothing(start_server: StartServer) -> None:
    server = start_server(config(spare_children=4))
    _spares(server, 4)
    payloads = [os.urandom(100 + i) for i in range(8)]
    socks = []
    for payload in payloads:
        sock = connect(server.tcp_address)
        sock.sendall(payload)
        socks.append(sock)
    server.signal(signal.SIGTERM)
    for sock, payload in zip(socks, payloads, strict=True):
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == payload
        sock.close()
    assert server.wait() == 0
    assert not zombie_children(server)
