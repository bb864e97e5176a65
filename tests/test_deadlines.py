"""Deadlines for whole operations (forkserver/child/deadlines.py, limits.py),
end to end: ``send_timeout`` bounds a whole sendall() or wfile write however
many sends it takes, in every handler style; ``request_timeout`` (with
``request_min_rate``) cuts a client that trickles its request; a handler's own
socketserver-style ``timeout`` is logged like idle_timeout, without a traceback.

Each bound is measured from the client's side: from the handler's greeting
(it starts sending, or waiting) to its child being reaped.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.helpers.clients import connect, read_pid_greeting, recv_to_eof, recv_until
from tests.helpers.processes import idle_children, reaped
from tests.helpers.servers import (
    FORK_ON_ACCEPT,
    POOL,
    ServerProcess,
    StartServer,
    config,
    wait_until,
)

SERVICES = "tests.helpers.deadline_services"
SLACK = 0.5  # what the issue allows past each deadline


def _exited_normally(server: ServerProcess, pid: int) -> bool:
    """After the stop: *pid*'s end went unremarked (exit status 0, no signal)."""
    assert server.poll() is not None, "stop the server first: the log must be complete"
    return not re.search(rf"child {pid} for .* (exit status|killed by)", server.log)


def _cut_within(pid: int, started: float, bound: float) -> float:
    """Wait for *pid* to be reaped; the seconds it took since *started*, at most *bound*."""
    wait_until(lambda: reaped(pid), bound + 10, "the child to be reaped")
    took = time.monotonic() - started
    assert took <= bound, f"cut {took:.2f}s after it began, over {bound}s"
    return took


@contextmanager
def _slow_reader(sock: socket.socket) -> Iterator[None]:
    """Read 1 KiB every 50 ms (20 KiB/s) in a thread, for the block: each send
    makes progress, so only a deadline for the whole sendall() ends it."""
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set() and sock.recv(1024):
                time.sleep(0.05)
        except OSError:
            pass  # reset by the server's close: the point

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield
    finally:
        done.set()
        reader.join(10)


def _small_window_client(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


# -- send_timeout: a deadline per sendall, not per send() --------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(f"{SERVICES}:sendall_big", id="function-sendall"),
        pytest.param(f"{SERVICES}:WfileBig", id="class-wfile"),
        pytest.param(f"{SERVICES}:BufferedWfileBig", id="class-buffered-wfile"),
    ],
)
@pytest.mark.parametrize("reads", [False, True], ids=["never-reads", "reads-slowly"])
def test_send_timeout_bounds_the_whole_send_of_a_reply(
    start_server: StartServer, handler: str, reads: bool
) -> None:
    send_timeout = 1.0
    server = start_server(config(handler, send_timeout=send_timeout))
    with _small_window_client(server.tcp_address) as sock:
        port = sock.getsockname()[1]
        pid = read_pid_greeting(sock)
        started = time.monotonic()
        if reads:
            with _slow_reader(sock):
                _cut_within(pid, started, send_timeout + SLACK)
        else:
            _cut_within(pid, started, send_timeout + SLACK)
    line = server.wait_for_log(rf"closing the connection from 127\.0\.0\.1:{port}: ")
    assert line.endswith("send_timeout (1s) expired: the client is not reading"), line
    assert f"[{pid}]" in line
    assert server.stop() == 0
    assert "Traceback" not in server.log
    assert _exited_normally(server, pid), server.log


@pytest.mark.timeout(60)
def test_send_timeout_in_a_spare(start_server: StartServer) -> None:
    send_timeout = 1.0
    server = start_server(config(f"{SERVICES}:sendall_big", send_timeout=send_timeout, **POOL))
    idle_children(server, POOL)
    with _small_window_client(server.tcp_address) as sock:
        pid = read_pid_greeting(sock)
        started = time.monotonic()
        with _slow_reader(sock):
            _cut_within(pid, started, send_timeout + SLACK)
    server.wait_for_log(r"send_timeout \(1s\) expired: the client is not reading")
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_send_timeout_bounds_an_exec_service_through_the_kernel(
    start_server: StartServer,
) -> None:
    # An exec service has only the fd: TCP_USER_TIMEOUT makes the kernel drop
    # a client that takes no data for send_timeout, and the write fails.
    send_timeout = 1.0
    handler = "exec:/bin/sh -c 'echo $$; exec cat /dev/zero'"
    server = start_server(config(handler, send_timeout=send_timeout))
    with _small_window_client(server.tcp_address) as sock:
        pid = read_pid_greeting(sock)
        started = time.monotonic()
        _cut_within(pid, started, send_timeout + SLACK)
    # cat's write failed (ETIMEDOUT): its status, as the service's own.
    server.wait_for_log(rf"child {pid} for 127\.0\.0\.1:\d+ .*exit status 1")
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_send_timeout_leaves_a_reader_that_keeps_up_alone(start_server: StartServer) -> None:
    server = start_server(config(f"{SERVICES}:sendall_big", send_timeout=5))
    with connect(server.tcp_address, timeout=30) as sock:
        data = recv_to_eof(sock, timeout=30)
    greeting, _, body = data.partition(b"\n")
    assert len(body) == 32 << 20 and body.count(b"x") == len(body)
    assert server.stop() == 0
    assert "send_timeout" not in server.log
    assert _exited_normally(server, int(greeting)), server.log


# -- request_timeout: the first request's deadline, and a minimum rate --------------


@contextmanager
def _trickler(sock: socket.socket) -> Iterator[None]:
    """Send one byte a second (never a whole line) in a thread, for the block."""
    done = threading.Event()

    def trickle() -> None:
        try:
            while not done.wait(1.0):
                sock.send(b"a")
        except OSError:
            pass  # the server cut it: the point

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        yield
    finally:
        done.set()
        sender.join(10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("handler", "rate"),
    [
        pytest.param(f"{SERVICES}:ReadLines", {}, id="class-rfile"),
        pytest.param(f"{SERVICES}:line_echo", {}, id="function-recv"),
        pytest.param(
            f"{SERVICES}:ReadLines",
            {"request_min_rate": 500, "request_timeout_max": 10},
            id="min-rate",
        ),
    ],
)
def test_request_timeout_cuts_a_trickling_client_and_serves_a_normal_one(
    start_server: StartServer, handler: str, rate: dict[str, Any]
) -> None:
    request_timeout = 2.0
    server = start_server(config(handler, request_timeout=request_timeout, **rate))
    with connect(server.tcp_address, timeout=10) as slow:
        started = time.monotonic()
        port = slow.getsockname()[1]
        pid = read_pid_greeting(slow)  # a greeting is no reply: the deadline runs on
        # Meanwhile a normal client is served, and past its first reply it
        # may take its time: the deadline was for its request.
        with _trickler(slow), connect(server.tcp_address, timeout=10) as normal:
            other = read_pid_greeting(normal)
            normal.sendall(b"first line\n")
            assert recv_until(normal, b"first line\n").endswith(b"first line\n")
            _cut_within(pid, started, request_timeout + SLACK)
            time.sleep(max(0.0, started + request_timeout + 0.5 - time.monotonic()))
            normal.sendall(b"second line, after the deadline\n")
            assert recv_until(normal, b"deadline\n") == b"second line, after the deadline\n"
            normal.shutdown(socket.SHUT_WR)
            assert recv_to_eof(normal) == b""
    line = server.wait_for_log(rf"closing the connection from 127\.0\.0\.1:{port}: ")
    assert "request_timeout (2s) expired: the client sent " in line, line
    assert f"[{pid}]" in line
    wait_until(lambda: reaped(other), 10, "the normal client's child to be reaped")
    assert server.stop() == 0
    assert "Traceback" not in server.log
    assert _exited_normally(server, pid) and _exited_normally(server, other), server.log


@pytest.mark.timeout(60)
def test_request_min_rate_extends_the_deadline_for_a_client_sending_fast_enough(
    start_server: StartServer,
) -> None:
    # 2 s, plus a second per 100 bytes: 1,000 bytes sent in the first second
    # give until 12 s (capped at 5), so a line finished at 3 s is served.
    settings = {"request_timeout": 2, "request_min_rate": 100, "request_timeout_max": 5}
    server = start_server(config(f"{SERVICES}:ReadLines", **settings))
    with connect(server.tcp_address, timeout=10) as sock:
        read_pid_greeting(sock)
        sock.sendall(b"y" * 1000)
        time.sleep(3)  # past request_timeout, within what the rate earned
        sock.sendall(b"\n")
        assert recv_until(sock, b"\n") == b"y" * 1000 + b"\n"
    assert server.stop() == 0
    assert "request_timeout" not in server.log


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        pytest.param({}, "socket.socket", id="off"),
        pytest.param({"idle_timeout": 5}, "socket.socket", id="idle_timeout"),
        pytest.param({"request_timeout": 5}, "forkserver.child.deadlines.Connection", id="on"),
        pytest.param({"send_timeout": 5}, "forkserver.child.deadlines.Connection", id="send"),
    ],
)
def test_a_handler_gets_a_plain_socket_unless_a_deadline_is_set(
    start_server: StartServer, settings: dict[str, Any], kind: str
) -> None:
    # Decided once at start: with no deadline the child pays nothing for them.
    server = start_server(config(f"{SERVICES}:socket_class", **settings, **FORK_ON_ACCEPT))
    with connect(server.tcp_address) as sock:
        assert recv_to_eof(sock) == f"{kind}\n".encode()
    assert server.stop() == 0


# -- a handler's own timeout (socketserver's StreamRequestHandler.timeout) ---------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("settings", [{}, {"idle_timeout": 30}], ids=["alone", "over-idle"])
def test_a_handler_timeout_is_logged_like_idle_timeout(
    start_server: StartServer, settings: dict[str, Any]
) -> None:
    server = start_server(config(f"{SERVICES}:OwnTimeout", **settings))
    with connect(server.tcp_address, timeout=10) as silent:
        port = silent.getsockname()[1]
        pid = read_pid_greeting(silent)
        started = time.monotonic()
        assert recv_to_eof(silent, timeout=10) == b""  # closed by the child
        _cut_within(pid, started, 1 + SLACK)
    line = server.wait_for_log(rf"closing the connection from 127\.0\.0\.1:{port}: ")
    assert line.endswith("the handler's timeout (1s) expired: the client sent nothing"), line
    assert f"[{pid}]" in line
    assert server.stop() == 0
    assert "Traceback" not in server.log
    assert _exited_normally(server, pid), server.log  # exit status 0, as idle_timeout's
