"""forkserver/handlers.py: the handler contracts, under the CLI and through forkserver.Server.

The in-process tests fork the pytest process itself: each child runs the
handler and leaves with os._exit, never returning into pytest.  Every such
test stops its server in a ``finally`` and joins the serving thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator

import psutil
import pytest

import forkserver
from forkserver.handlers import import_handler
from tests.helpers.clients import echo_roundtrip, occupy_port
from tests.helpers.servers import StartServer, config, wait_until
from tests.helpers.services import AddressReply, SocketserverEcho, echo_function

# Every byte value, lines of several lengths, and a last line with no newline.
PAYLOAD = bytes(range(256)) * 512 + b"\n".join(b"x" * n for n in range(300)) + b"\nno newline"


# -- under the CLI --------------------------------------------------------------


@pytest.mark.parametrize(
    "handler",
    [
        "tests.helpers.services:SocketserverEcho",  # socketserver.BaseRequestHandler subclass
        "tests.helpers.services:SocketserverLineEcho",  # socketserver.StreamRequestHandler subclass
        "tests.helpers.services:echo_function",  # plain function handler(conn, addr)
        "tests.helpers.services:LineEcho",  # forkserver.StreamHandler, rfile/wfile
    ],
)
def test_handler_echoes_exactly_under_the_cli(start_server: StartServer, handler: str) -> None:
    server = start_server(config(handler=handler))
    assert f"handler {handler}," in server.log
    assert echo_roundtrip(server.tcp_address, PAYLOAD) == PAYLOAD
    assert echo_roundtrip(server.tcp_address, b"") == b""
    assert server.stop() == 0
    # Every child exited 0: an abnormal exit would have been logged.
    assert "exit status" not in server.log
    assert "Traceback" not in server.log


def test_import_handler_resolves_dotted_attribute() -> None:
    assert import_handler("forkserver.handlers:StreamHandler") is forkserver.StreamHandler
    assert import_handler("tests.helpers.services:echo_function") is echo_function
    assert import_handler("forkserver:Server.shutdown") is forkserver.Server.shutdown


# -- forkserver.Server in this process -------------------------------------------


def _new_children(before: set[int]) -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if p.pid not in before]


def _zombies(before: set[int]) -> list[psutil.Process]:
    found = []
    for p in _new_children(before):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


@contextlib.contextmanager
def _serving(server: forkserver.Server) -> Iterator[threading.Thread]:
    """serve_forever() in a thread; on the way out shutdown(), join, server_close()."""
    thread = threading.Thread(target=server.serve_forever, name="serve_forever", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        try:
            server.shutdown()
            thread.join(30)
        finally:
            server.server_close()
    assert not thread.is_alive(), "serve_forever() did not return after shutdown()"


def test_socketserver_drop_in_reaps_children_while_serving_in_a_thread() -> None:
    before = {p.pid for p in psutil.Process().children()}
    with forkserver.Server(("127.0.0.1", 0), SocketserverEcho, max_children=8) as srv:
        thread = threading.Thread(target=srv.serve_forever, name="serve_forever", daemon=True)
        thread.start()
        try:
            host, port = srv.server_address
            assert host == "127.0.0.1"
            assert port != 0
            assert echo_roundtrip(srv.server_address, PAYLOAD) == PAYLOAD
            for i in range(50):
                message = f"short connection {i}\n".encode()
                assert echo_roundtrip(srv.server_address, message) == message
            # No SIGCHLD handler outside the main thread: pidfds must do the reaping.
            try:
                wait_until(lambda: not _new_children(before), timeout=5)
            except AssertionError:
                pytest.fail(
                    f"children left while serving: {_new_children(before)}; "
                    f"zombies among them: {_zombies(before)}"
                )
            assert thread.is_alive()
            assert echo_roundtrip(srv.server_address, b"still serving") == b"still serving"
        finally:
            srv.shutdown()
            thread.join(30)
        assert not thread.is_alive()
    assert _new_children(before) == []
    assert len(srv.children) == 0
    assert srv.accepted == 52


def test_handler_class_gets_request_client_address_and_server() -> None:
    with (
        forkserver.Server(("127.0.0.1", 0), AddressReply) as srv,
        _serving(srv),
        socket.create_connection(srv.server_address, timeout=10) as sock,
    ):
        reply = sock.makefile("rb").readline()
        host, port = sock.getsockname()
        assert reply == f"{host} {port} {srv.server_address[1]}\n".encode()


def test_unix_socket_server() -> None:
    before = {p.pid for p in psutil.Process().children()}
    # An explicit short directory: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="forkserver-", dir="/tmp") as tmp:
        path = os.path.join(tmp, "s.sock")
        srv = forkserver.Server(path, echo_function, unix_mode=0o600)
        with _serving(srv):
            assert srv.server_address == path
            mode = os.stat(path).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
            assert echo_roundtrip(path, PAYLOAD) == PAYLOAD
            assert echo_roundtrip(path, b"second") == b"second"
        assert not os.path.exists(path), "the socket file outlived server_close()"
    assert _new_children(before) == []


def test_bind_and_activate_false_binds_on_server_activate() -> None:
    srv = forkserver.Server(("127.0.0.1", 0), SocketserverEcho, bind_and_activate=False)
    try:
        unbound = srv.server_address
        assert unbound is None
        srv.server_activate()
        host, port = srv.server_address
        assert host == "127.0.0.1"
        assert port != 0
        # Listening, though not serving: the kernel completes the handshake.
        with socket.create_connection((host, port), timeout=10):
            pass
    finally:
        srv.server_close()


def test_server_rejects_a_bad_option() -> None:
    with pytest.raises(forkserver.ConfigError) as caught:
        forkserver.Server(("127.0.0.1", 0), SocketserverEcho, max_children=0)
    assert str(caught.value) == "server.max_children must be an integer 1-100000, got 0"


def test_server_raises_bind_error_naming_address_and_reason() -> None:
    with occupy_port() as taken:
        port = taken.getsockname()[1]
        with pytest.raises(forkserver.BindError) as caught:
            forkserver.Server(("127.0.0.1", port), SocketserverEcho)
    assert str(caught.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"


def test_serve_forever_runs_again_after_shutdown() -> None:
    with forkserver.Server(("127.0.0.1", 0), SocketserverEcho) as srv:
        for round_ in (b"first", b"second"):
            thread = threading.Thread(target=srv.serve_forever, daemon=True)
            thread.start()
            try:
                assert echo_roundtrip(srv.server_address, round_, timeout=5) == round_
            finally:
                srv.shutdown()
                thread.join(30)
            assert not thread.is_alive()
