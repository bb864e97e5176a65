"""Hostile and broken clients, end to end: slowloris, resets mid-transfer,
half-closed clients, and garbage for the HTTP example.  Throughout, the server
keeps serving everyone else, and each such child ends within its timeouts.
(Clients that never read: test_limits.py, send_timeout.)
"""

from __future__ import annotations

import os
import re
import resource
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.clients import connect, echo_roundtrip, read_pid_greeting, recv_to_eof
from tests.helpers.processes import idle_children, reaped
from tests.helpers.servers import MODES, ServerProcess, StartServer, config, wait_until

HTTP = "forkserver.examples.http:HTTPHandler"


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """This process's RLIMIT_NOFILE soft limit raised to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _echo_ok(address: tuple[str, int], i: int) -> None:
    payload = i.to_bytes(4, "big") + os.urandom(4000)
    assert echo_roundtrip(address, payload, timeout=30) == payload, f"ordinary client {i}"


def _children_settle(server: ServerProcess, mode: dict[str, Any]) -> None:
    """Back to the idle children only, and no zombie."""
    idle_children(server, mode, timeout=30)


# -- slowloris ----------------------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", MODES)
def test_slowloris_connections_are_all_closed_while_others_are_served(
    start_server: StartServer, mode: dict[str, Any], many_descriptors: None
) -> None:
    n_silent, n_trickle, idle, lifetime = 1000, 20, 2, 6
    server = start_server(
        config(
            idle_timeout=idle,
            max_lifetime=lifetime,
            max_children=1100,
            backlog=1024,
            **mode,
        )
    )
    idle_children(server, mode)
    address = server.tcp_address
    silent: list[socket.socket] = []
    trickle: list[socket.socket] = []
    sent = [0] * n_trickle
    stop_trickle = threading.Event()

    def drip_once() -> None:
        for i, sock in enumerate(trickle):
            try:
                sock.send(b".")
                sent[i] += 1
            except OSError:
                pass  # closed by the server (or the test): nothing more to send

    def drip() -> None:  # a byte every half second: never idle for idle_timeout
        for _ in range(240):
            if stop_trickle.wait(0.5):
                return
            drip_once()

    dripper = threading.Thread(target=drip, daemon=True)
    try:
        for _ in range(n_trickle):
            trickle.append(connect(address, timeout=30))
        drip_once()
        dripper.start()
        for i in range(n_silent):
            silent.append(connect(address, timeout=30))
            if i % 100 == 99:  # ordinary clients, served meanwhile
                _echo_ok(address, i)
        for i in range(5):
            _echo_ok(address, n_silent + i)
        # Every slowloris connection is closed by the server.
        received = {sock: b"" for sock in trickle}
        open_socks = set(silent + trickle)
        with selectors.DefaultSelector() as sel:
            for sock in open_socks:
                sel.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + 60
            while open_socks and time.monotonic() < deadline:
                for key, _ in sel.select(1.0):
                    sock = key.fileobj  # type: ignore[assignment]
                    try:
                        data = sock.recv(4096)
                    except ConnectionResetError:
                        # A child killed with a byte unread in its buffer: the
                        # kernel resets rather than closes.  Closed all the same.
                        assert sock in received, "a silent client was reset"
                        data = b""
                    if data and sock in received:
                        received[sock] += data
                    elif data:
                        raise AssertionError(f"a silent client got {data!r}")
                    else:
                        sel.unregister(sock)
                        open_socks.discard(sock)
        assert not open_socks, f"{len(open_socks)} slowloris connections still open"
        stop_trickle.set()
        dripper.join(10)
        for i, sock in enumerate(trickle):  # served until the end: bytes echoed
            got = received[sock]
            assert got == b"." * len(got) and 1 <= len(got) <= sent[i], (i, got, sent[i])
        silent_ports = {sock.getsockname()[1] for sock in silent}
        trickle_ports = {sock.getsockname()[1] for sock in trickle}
    finally:
        stop_trickle.set()
        for sock in silent + trickle:
            sock.close()
    _echo_ok(address, n_silent + 5)
    _children_settle(server, mode)
    assert server.stop() == 0  # the log is complete
    # Each closed for its reason: the silent ones by idle_timeout (in the
    # child), the trickling ones, never idle, by max_lifetime (the parent).
    log = server.log
    idled = re.findall(rf"from 127\.0\.0\.1:(\d+): idle_timeout \({idle}s\) expired", log)
    aged = re.findall(rf"for 127\.0\.0\.1:(\d+) exceeded max_lifetime \({lifetime}s\)", log)
    assert {int(p) for p in idled} == silent_ports
    assert {int(p) for p in aged} == trickle_ports


# -- resets, half-closes --------------------------------------------------------------


def _reset_mid_transfer(address: tuple[str, int]) -> tuple[int, int]:
    """Stream data to an echoing child, read some of the echo, then reset
    the connection (SO_LINGER 0).  Returns (the child's pid, our port)."""
    sock = connect(address, timeout=10)
    try:
        port = sock.getsockname()[1]
        pid = read_pid_greeting(sock)
        sock.setblocking(False)
        chunk = os.urandom(1 << 16)
        echoed = 0
        deadline = time.monotonic() + 20
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while echoed < (1 << 20) and time.monotonic() < deadline:
                for _, events in sel.select(1.0):
                    if events & selectors.EVENT_WRITE:
                        try:
                            sock.send(chunk)
                        except BlockingIOError:
                            pass
                    if events & selectors.EVENT_READ:
                        echoed += len(sock.recv(1 << 16))
        assert echoed >= 1 << 20, "the echo did not get going"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()  # with unread data and SO_LINGER 0: RST
    return pid, port


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_reset_mid_transfer_ends_the_child_and_serving_goes_on(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(config("tests.helpers.services:pid_then_echo", **mode))
    idle_children(server, mode)
    address = server.tcp_address
    for _ in range(3):
        pid, _ = _reset_mid_transfer(address)
        # The child notices (whatever status it ends with) and is reaped.
        wait_until(lambda: reaped(pid), 20, f"child {pid} to end after the reset")  # noqa: B023
        greeting, _, echoed = echo_roundtrip(address, b"next client").partition(b"\n")
        assert greeting.isdigit() and echoed == b"next client"
    _children_settle(server, mode)
    assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_half_closed_clients_get_their_whole_echo(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(config(**mode))
    idle_children(server, mode)
    address = server.tcp_address
    for size in (0, 1, 65536 + 3, 4 << 20):
        payload = os.urandom(size)
        assert echo_roundtrip(address, payload) == payload, size
    # Half-closed first, then read slowly: the echo waits for the reader.
    with connect(address) as sock:
        payload = os.urandom(1 << 20)
        sock.sendall(payload[: 1 << 19])
        got = b""
        while len(got) < 1 << 18:
            got += sock.recv(4096)
        sock.sendall(payload[1 << 19 :])
        sock.shutdown(socket.SHUT_WR)
        assert got + recv_to_eof(sock) == payload
    _children_settle(server, mode)
    assert server.stop() == 0


# -- garbage for the HTTP example ---------------------------------------------------------

_NO_NEWLINES = bytes(b for b in range(256) if b not in b"\r\n")

HTTP_CASES = [
    # (what, request, expected status); each request is followed by a half-close
    ("a good request, for comparison", b"GET / HTTP/1.0\r\n\r\n", 200),
    ("a 20 KB request line", b"GET /" + b"a" * 20_000 + b" HTTP/1.0\r\n\r\n", 414),
    ("200 header lines", b"GET / HTTP/1.0\r\n" + b"X-Filler: yes\r\n" * 200 + b"\r\n", 431),
    ("a 10 KB header line", b"GET / HTTP/1.0\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n", 431),
    ("binary garbage", _NO_NEWLINES * 8 + b"\r\n\r\n", 400),
    ("64 KB of garbage without a newline", (_NO_NEWLINES * 260)[:65536], 414),
    ("not HTTP at all", b"hello there\r\n\r\n", 400),
    ("an unknown method", b"BREW /pot HTTP/1.0\r\n\r\n", 501),
    ("a path without a slash", b"GET index.html HTTP/1.0\r\n\r\n", 400),
    ("EOF inside the headers", b"GET / HTTP/1.0\r\nHost: x\r\n", 400),
    ("EOF before anything", b"", 400),
]


@pytest.mark.timeout(90)
def test_http_example_answers_garbage_with_an_error_and_closes(start_server: StartServer) -> None:
    server = start_server(config(HTTP))
    address = server.tcp_address
    for what, request, status in HTTP_CASES:
        with connect(address, timeout=10) as sock:
            try:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:  # the server may answer before reading it all
                raise AssertionError(f"{what}: the server reset the connection: {exc}") from None
            reply = recv_to_eof(sock, timeout=10)  # never a hang
        assert reply.startswith(f"HTTP/1.0 {status} ".encode()), (what, reply[:80])
        assert b"Connection: close" in reply, what
    # Every child ended by itself, normally; the server serves on.
    _children_settle(server, {})
    assert echo_roundtrip(address, b"GET /again HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 ")
    assert server.stop() == 0
    assert not re.search(r"(exit status|killed by|handler failed)", server.log), server.log


@pytest.mark.timeout(60)
def test_http_request_stalled_mid_line_is_ended_by_max_lifetime(
    start_server: StartServer,
) -> None:
    # The handler's own timeout would answer 408 after 10 s; max_lifetime
    # bounds any child, whatever its handler does.
    server = start_server(config(HTTP, max_lifetime=1))
    with connect(server.tcp_address, timeout=10) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"GET / HT")
        assert recv_to_eof(sock, timeout=10) == b""
    server.wait_for_log(rf"child \d+ for 127\.0\.0\.1:{port} exceeded max_lifetime \(1s\)")
    server.wait_for_log(rf"child \d+ for 127\.0\.0\.1:{port} killed by SIGTERM")
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_http_request_stalled_mid_line_is_ended_by_idle_timeout(
    start_server: StartServer,
) -> None:
    server = start_server(config(HTTP, idle_timeout=1))
    with connect(server.tcp_address, timeout=10) as sock:
        sock.sendall(b"GET / HT")
        sock.settimeout(3)
        started = time.monotonic()
        try:
            reply = recv_to_eof(sock, timeout=3)
        except (AssertionError, TimeoutError):
            reply = None
        waited = time.monotonic() - started
    assert reply is not None and waited < 3, f"still open after {waited:.1f}s"
    assert server.stop() == 0
