"""CPython 3.11's Lib/test/test_socketserver.py, its forking tests, on forkserver.

Ported as the issue asks: only what names the classes changes
(``socketserver.ForkingTCPServer`` becomes ``forkserver.ForkingTCPServer``,
a ``socketserver.TCPServer`` base a ``forkserver.compat.TCPServer``), and
CPython's assertions stay, ``simple_subprocess`` among them: a process the
test forks itself keeps its exit status (72) while the server reaps its
own children (issue 1540386).  unittest's ``self.assert*`` became pytest's
``assert``; the servers run in this process, in a thread, as CPython's do.
Every test ends with no child of this process left, alive or zombie.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import socketserver  # the handler classes: forkserver runs them unchanged
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import forkserver
from forkserver import compat

pytestmark = pytest.mark.timeout(60)

TEST_STR = b"hello world\n"
HOST = "127.0.0.1"
SHORT_TIMEOUT = 30.0

ForkingUnixStreamServer = forkserver.ForkingUnixStreamServer
ForkingUnixDatagramServer = forkserver.ForkingUnixDatagramServer


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """CPython's reap_children(), made an assertion: every child is reaped."""
    yield
    left = psutil.Process().children()
    assert not left, f"children left: {[(p.pid, p.status()) for p in left]}"


def receive(sock: socket.socket, n: int, timeout: float = SHORT_TIMEOUT) -> bytes:
    r, _w, _x = select.select([sock], [], [], timeout)
    if sock in r:
        return sock.recv(n)
    raise RuntimeError(f"timed out on {sock!r}")


@contextlib.contextmanager
def simple_subprocess() -> Iterator[None]:
    """Tests that a custom child process is not waited on (Issue 1540386)"""
    pid = os.fork()
    if pid == 0:
        # Don't raise an exception; it would be caught by the test harness.
        os._exit(72)
    try:
        yield None
    finally:
        pid2, status = os.waitpid(pid, 0)
        assert pid2 == pid
        assert os.waitstatus_to_exitcode(status) == 72


class SocketServerTest:
    """Test all socket servers."""

    test_files: list[str]

    def pickaddr(self, proto: int) -> Any:
        if proto == socket.AF_INET:
            return (HOST, 0)
        fn = tempfile.mktemp(prefix="unix_socket.")
        self.test_files.append(fn)
        return fn

    def make_server(self, addr: Any, svrcls: type, hdlrbase: type) -> Any:
        class MyServer(svrcls):  # type: ignore[misc]
            def handle_error(self, request: Any, client_address: Any) -> None:
                self.close_request(request)
                raise  # noqa: PLE0704 - CPython's: re-raises the handler's exception

        class MyHandler(hdlrbase):  # type: ignore[misc]
            def handle(self) -> None:
                line = self.rfile.readline()
                self.wfile.write(line)

        server = MyServer(addr, MyHandler)
        assert server.server_address == server.socket.getsockname()
        return server

    def run_server(self, svrcls: type, hdlrbase: type, testfunc: Callable[..., None]) -> None:
        server = self.make_server(self.pickaddr(svrcls.address_family), svrcls, hdlrbase)  # type: ignore[attr-defined]
        addr = server.server_address
        t = threading.Thread(
            name=f"{svrcls} serving",
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
        )
        t.daemon = True  # In case this function raises.
        t.start()
        for _ in range(3):
            testfunc(svrcls.address_family, addr)  # type: ignore[attr-defined]
        server.shutdown()
        t.join()
        server.server_close()
        assert server.socket.fileno() == -1
        if isinstance(server, forkserver.ForkingMixIn):
            # bpo-31151: Check that ForkingMixIn.server_close() waits until
            # all children completed
            assert not server.active_children  # type: ignore[attr-defined]

    def stream_examine(self, proto: int, addr: Any) -> None:
        with socket.socket(proto, socket.SOCK_STREAM) as s:
            s.connect(addr)
            s.sendall(TEST_STR)
            buf = data = receive(s, 100)
            while data and b"\n" not in buf:
                data = receive(s, 100)
                buf += data
            assert buf == TEST_STR

    def dgram_examine(self, proto: int, addr: Any) -> None:
        with socket.socket(proto, socket.SOCK_DGRAM) as s:
            if proto == socket.AF_UNIX:
                s.bind(self.pickaddr(proto))
            s.sendto(TEST_STR, addr)
            buf = data = receive(s, 100)
            while data and b"\n" not in buf:
                data = receive(s, 100)
                buf += data
            assert buf == TEST_STR


class TestSocketServer(SocketServerTest):
    @pytest.fixture(autouse=True)
    def _files(self) -> Iterator[None]:
        self.test_files = []
        yield
        for fn in self.test_files:
            with contextlib.suppress(OSError):
                os.remove(fn)

    def test_ForkingTCPServer(self) -> None:
        with simple_subprocess():
            self.run_server(
                forkserver.ForkingTCPServer,
                socketserver.StreamRequestHandler,
                self.stream_examine,
            )

    def test_ForkingUnixStreamServer(self) -> None:
        with simple_subprocess():
            self.run_server(
                ForkingUnixStreamServer, socketserver.StreamRequestHandler, self.stream_examine
            )

    def test_ForkingUDPServer(self) -> None:
        with simple_subprocess():
            self.run_server(
                forkserver.ForkingUDPServer,
                socketserver.DatagramRequestHandler,
                self.dgram_examine,
            )

    def test_ForkingUnixDatagramServer(self) -> None:
        self.run_server(
            ForkingUnixDatagramServer, socketserver.DatagramRequestHandler, self.dgram_examine
        )

    def test_shutdown(self) -> None:
        # Issue #2302: shutdown() should always succeed in making an
        # other thread leave serve_forever().
        class MyServer(forkserver.ForkingTCPServer):
            pass

        class MyHandler(socketserver.StreamRequestHandler):
            pass

        threads = []
        for _ in range(20):
            s = MyServer((HOST, 0), MyHandler)
            t = threading.Thread(
                name="MyServer serving", target=s.serve_forever, kwargs={"poll_interval": 0.01}
            )
            t.daemon = True  # In case this function raises.
            threads.append((t, s))
        for t, s in threads:
            t.start()
            s.shutdown()
        for t, s in threads:
            t.join()
            s.server_close()

    def test_close_immediately(self) -> None:
        class MyServer(forkserver.ForkingMixIn, compat.TCPServer):
            pass

        server = MyServer((HOST, 0), lambda: None)
        server.server_close()

    def test_tcpserver_bind_leak(self) -> None:
        # Issue #22435: the server socket wouldn't be closed if bind()/listen()
        # failed.
        # Create many servers for which bind() will fail, to see if this result
        # in FD exhaustion.
        for _ in range(1024):
            with pytest.raises(OverflowError):
                forkserver.ForkingTCPServer((HOST, -1), socketserver.StreamRequestHandler)

    def test_context_manager(self) -> None:
        with forkserver.ForkingTCPServer((HOST, 0), socketserver.StreamRequestHandler) as server:
            pass
        assert server.socket.fileno() == -1


# -- ErrorHandlerTest: normal exceptions reach handle_error(), SystemExit does not --

TESTFN = "forkserver_test_socketserver_log"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """CPython's TESTFN is relative to the working directory: make it tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def check_result(handled: bool) -> None:
    with open(TESTFN) as log:
        expected = "Handler called\n" + "Error handled\n" * handled
        assert log.read() == expected


class BaseErrorTestServer(compat.TCPServer):
    def __init__(self, exception: type[BaseException]) -> None:
        self.exception = exception
        super().__init__((HOST, 0), BadHandler)
        with socket.create_connection(self.server_address):
            pass
        try:
            self.handle_request()
        finally:
            self.server_close()
        self.wait_done()

    def handle_error(self, request: Any, client_address: Any) -> None:
        with open(TESTFN, "a") as log:
            log.write("Error handled\n")

    def wait_done(self) -> None:
        pass


class BadHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with open(TESTFN, "a") as log:
            log.write("Handler called\n")
        raise self.server.exception("Test error")  # type: ignore[attr-defined]


class ForkingErrorTestServer(forkserver.ForkingMixIn, BaseErrorTestServer):
    pass


def test_forking_handled(in_tmp: Path) -> None:
    ForkingErrorTestServer(ValueError)
    check_result(handled=True)


def test_forking_not_handled(in_tmp: Path) -> None:
    ForkingErrorTestServer(SystemExit)
    check_result(handled=False)


# -- MiscTestCase ------------------------------------------------------------------


def test_shutdown_request_called_if_verify_request_false() -> None:
    # Issue #26309: BaseServer should call shutdown_request even if
    # verify_request is False

    class MyServer(forkserver.ForkingTCPServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return False

        shutdown_called = 0

        def shutdown_request(self, request: Any) -> None:
            self.shutdown_called += 1
            forkserver.ForkingTCPServer.shutdown_request(self, request)

    server = MyServer((HOST, 0), socketserver.StreamRequestHandler)
    s = socket.socket(server.address_family, socket.SOCK_STREAM)
    s.connect(server.server_address)
    s.close()
    server.handle_request()
    assert server.shutdown_called == 1
    server.server_close()
