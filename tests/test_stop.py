"""Graceful stop (SIGTERM) end to end: what is in flight, in the backlog or
half-read when the stop begins is served in full or refused at connect(),
with spares or without, under load.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.clients import connect, recv_to_eof, recv_until, send_and_read, udp_queued_bytes
from tests.helpers.proxy import PAYLOAD, ParentWatch, expected, v2
from tests.helpers.servers import ABNORMAL_EXIT, StartServer, config, wait_until
from tests.helpers.spares import idle_spares, write_versioned
from tests.helpers.transports import (
    ECHO,
    PROXY_REPORT,
    hold_one_datagram,
    listen,
    pid_reply,
    read_until_closed,
    server_table,
    tcp_at,
)


@pytest.mark.timeout(30)
def test_stop_waits_for_an_incomplete_header_and_serves_it(start_server: StartServer) -> None:
    server = start_server(
        listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True, proxy_timeout=20)
    )
    address = tcp_at(server, 0)
    header = v2("2001:db8::9", 9999)
    with connect(address) as slow:
        ParentWatch(server, address[1]).send(slow, header[:17])
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"stopping: no longer accepting")
        with pytest.raises(ConnectionRefusedError):  # the listener is closed...
            connect(address).close()
        assert server.poll() is None  # ...but the parent waits for the header
        assert send_and_read(slow, header[17:] + PAYLOAD) == expected("2001:db8::9", 9999)
    assert server.wait(20) == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log
    assert "PROXY header from" not in server.log


@pytest.mark.timeout(30)
def test_stop_closes_an_incomplete_header_at_proxy_timeout(start_server: StartServer) -> None:
    server = start_server(
        server_table(graceful_timeout=20)
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True, proxy_timeout=1)
    )
    address = tcp_at(server, 0)
    with connect(address) as slow:
        port = slow.getsockname()[1]
        ParentWatch(server, address[1]).send(slow, b"PROXY TCP4 1.2.")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert read_until_closed(slow) == b""
        assert server.wait(20) == 0
    # Not before proxy_timeout, nor as late as graceful_timeout.
    assert 0.5 < time.monotonic() - started < 10
    server.wait_for_log(rf"PROXY header from 127\.0\.0\.1:{port}: no complete header within")


def _client_loop(
    address: tuple[str, int], n: int, deadline: float, results: dict[str, list[Any]]
) -> None:
    """Echo round trips until the server refuses a connect() (or the deadline).

    results["lost"] gets (local port or 0, what happened) for each connection
    that was neither refused nor served in full."""
    i = 0
    while time.monotonic() < deadline:
        payload = b"client %d round %d " % (n, i) * 40
        i += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            try:
                sock.connect(address)
            except ConnectionRefusedError:
                results["refused"].append(n)
                return  # the listener is closed for good
            except OSError as exc:  # reset in the handshake: not a refusal either
                results["lost"].append((0, f"connect(): {type(exc).__name__}: {exc}"))
                continue
            port = sock.getsockname()[1]
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            except OSError as exc:  # reset, or no reply in 10 s
                results["lost"].append((port, f"{type(exc).__name__}: {exc}"))
            else:
                if reply == payload:
                    results["served"].append(n)
                else:
                    results["lost"].append((port, f"{len(reply)} of {len(payload)} bytes"))
        finally:
            sock.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("settings", [{}, {"spare_children": 2}], ids=["fork", "pool"])
def test_graceful_stop_under_load_refuses_or_serves_every_connection(
    start_server: StartServer, settings: dict[str, Any]
) -> None:
    # access_log: a child writes one line per connection it served, naming
    # the client's port, so a lost connection can be told apart: one the
    # server accepted (a bug in the drain, the fork or the child) or one the
    # kernel reset before any process accepted it.
    server = start_server(
        server_table(access_log=True, **settings) + listen(tcp="127.0.0.1:0", handler=ECHO)
    )
    address = tcp_at(server, 0)
    results: dict[str, list[Any]] = {"served": [], "refused": [], "lost": []}
    deadline = time.monotonic() + 20
    clients = [
        threading.Thread(target=_client_loop, args=(address, n, deadline, results))
        for n in range(4)
    ]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: len(results["served"]) >= 200, 15, "load before the stop")
        server.signal(signal.SIGTERM)
        assert server.wait(20) == 0
    finally:
        for thread in clients:
            thread.join(30)
    server.wait_for_log("stopped: all children have exited")  # after every access line
    assert sorted(results["refused"]) == [0, 1, 2, 3]  # every client ran until the stop
    assert not ABNORMAL_EXIT.search(server.log), server.log
    # Nor did the parent close one it had accepted (refused, or dropped from its queue).
    assert not re.search(r"refused|unserved|fork\(\) failed", server.log), server.log
    served_ports = {int(m.group(1)) for m in re.finditer(r"127\.0\.0\.1:(\d+) pid ", server.log)}
    assert len(served_ports) >= len(results["served"])
    # Nor a connection that completed its handshake after the last accept():
    # new SYNs are dropped (refuse_new) before the final drain.
    assert results["lost"] == [], results["lost"][:5]


@pytest.mark.timeout(30)
def test_stop_serves_a_datagram_waiting_at_max_children(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, target, client, writer = hold_one_datagram(start_server, tmp_path, "wait")
    with client:
        client.sendto(b"second", target)
        wait_until(lambda: udp_queued_bytes(target[1]) > 0, 10, "the datagram to be queued")
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"stopping: no longer accepting")
        os.close(writer)
        _, first = pid_reply(client)
        assert first.startswith(b"hold ")
        assert server.wait(20) == 0
        assert "dropped a datagram" not in server.log, server.log
        client.settimeout(5)
        assert pid_reply(client)[1] == b"second"


@pytest.mark.timeout(60)
def test_sigterm_with_spares_serves_every_connected_client(start_server: StartServer) -> None:
    server = start_server(config(spare_children=4, max_children=6))
    idle_spares(server, 4)
    payloads = [os.urandom(200 + i) for i in range(24)]
    socks = []
    try:
        for payload in payloads:
            sock = connect(server.tcp_address)
            sock.sendall(payload)
            socks.append(sock)
        server.signal(signal.SIGTERM)
        server.wait_for_log("stopping")
        for sock, payload in zip(socks, payloads, strict=True):
            sock.shutdown(socket.SHUT_WR)
            assert recv_to_eof(sock) == payload
    finally:
        for sock in socks:
            sock.close()
    assert server.wait(30) == 0
    assert "unserved" not in server.log and "closing" not in server.log, server.log
    assert not ABNORMAL_EXIT.search(server.log), server.log


@pytest.mark.timeout(60)
def test_sigterm_during_continuous_load_loses_no_accepted_connection(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_versioned(tmp_path, "v1")
    server = start_server(config("versioned:handler", spare_children=3, max_children=16))
    address = server.tcp_address
    idle_spares(server, 3)
    lost: list[BaseException] = []
    refused = served = 0
    lock = threading.Lock()
    stop = threading.Event()

    def run() -> None:
        nonlocal refused, served
        for _ in range(100_000):
            if stop.is_set():
                return
            try:
                sock = connect(address, timeout=10)
            except OSError:
                with lock:
                    refused += 1  # after the stop: not accepted, the client knows
                continue
            try:
                with sock:
                    # Connected: the kernel has it queued; it must be served.
                    assert recv_until(sock, b"\n").startswith(b"v1 ")
                    sock.sendall(b"x")
                    assert recv_until(sock, b":x") == b"v1:x"
                    sock.shutdown(socket.SHUT_WR)
                    assert recv_to_eof(sock) == b""
                with lock:
                    served += 1
            except (OSError, AssertionError) as exc:
                with lock:
                    lost.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: served > 50, 20, "load before the stop")
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
        wait_until(lambda: refused > 0, 20, "a client refused after the stop")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert lost == [], lost[:3]
    assert not ABNORMAL_EXIT.search(server.log), server.log
