"""Every BaseServer hook a subclass may override is called, in the process
socketserver calls it in; one that is not overridden leaves the default path.

Servers run in this process (in a thread, or through handle_request()),
as a socketserver program runs them: the parent's hooks record the pid they
ran in on the server object, the children's append "hook pid" lines to a
file.  Each test ends with no child of this process left, alive or zombie.
"""

from __future__ import annotations

import errno
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import forkserver
from forkserver.errors import BindError, ConfigError

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
PARENT = os.getpid()


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    yield
    left = psutil.Process().children()
    assert not left, f"children left: {[(p.pid, p.status()) for p in left]}"


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class Recording(forkserver.ForkingTCPServer):
    """Records where each hook ran: the parent's on the object, the child's in *log*."""

    log: Path

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls: list[tuple[str, int]] = []
        super().__init__(*args, **kwargs)

    def note(self, hook: str) -> None:
        if os.getpid() == PARENT:
            self.calls.append((hook, PARENT))
        else:
            with open(self.log, "a") as fp:
                fp.write(f"{hook} {os.getpid()}\n")

    def child_calls(self) -> list[str]:
        """The hooks the children called, in order (each in a child, not here)."""
        if not self.log.exists():
            return []
        lines = [line.split() for line in self.log.read_text().splitlines()]
        assert all(int(pid) != PARENT for _, pid in lines)
        return [hook for hook, _ in lines]

    def parent_calls(self) -> list[str]:
        return [hook for hook, _ in self.calls]


def make(base: type[Recording], tmp_path: Path, **hooks: Any) -> Recording:
    """A subclass of *base* overriding *hooks* (name: function), logging to tmp_path."""
    cls = type("Server", (base,), {"log": tmp_path / "child.log", **hooks})
    return cls((HOST, 0), Echo)  # type: ignore[no-any-return]


def ask(server: Any, line: bytes = b"hello\n") -> bytes:
    """Send *line*, read to EOF; a request shut down unread may be reset: b"" too."""
    got = b""
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        try:
            s.sendall(line)
            s.shutdown(socket.SHUT_WR)
            while data := s.recv(100):
                got += data
        except (ConnectionResetError, BrokenPipeError, OSError) as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                raise
    return got


class Serving:
    """serve_forever() in a thread; stopped with shutdown(), then server_close()."""

    def __init__(self, server: Any, poll_interval: float = 0.5) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, args=(poll_interval,))

    def __enter__(self) -> Any:
        self.thread.start()
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join()
        self.server.server_close()


# -- the parent's hooks ---------------------------------------------------------------


def _verify_false(self: Recording, request: Any, client_address: Any) -> bool:
    self.note("verify_request")
    return False


def _shutdown_noted(self: Recording, request: Any) -> None:
    self.note("shutdown_request")
    forkserver.ForkingTCPServer.shutdown_request(self, request)


def test_verify_request_false_shuts_the_request_down_unserved_in_serve_forever(
    tmp_path: Path,
) -> None:
    server = make(
        Recording, tmp_path, verify_request=_verify_false, shutdown_request=_shutdown_noted
    )
    with Serving(server):
        assert ask(server) == b""  # EOF: no handler ran
        assert ask(server) == b""
    assert server.parent_calls() == ["verify_request", "shutdown_request"] * 2
    assert server.child_calls() == []  # no fork at all


def test_verify_request_true_serves_through_the_hook_path(tmp_path: Path) -> None:
    def verify(self: Recording, request: Any, client_address: Any) -> bool:
        self.note("verify_request")
        return bool(client_address[0] == HOST)

    server = make(Recording, tmp_path, verify_request=verify, shutdown_request=_shutdown_noted)
    with Serving(server):
        assert ask(server, b"one\n") == b"one\n"
        assert server._parent.acceptor.request_path is not None
    assert server.parent_calls() == ["verify_request"]
    assert server.child_calls() == ["shutdown_request"]  # after finish_request, in the child


def test_no_hook_overridden_keeps_the_default_path(tmp_path: Path) -> None:
    server = make(Recording, tmp_path)
    with Serving(server):
        assert ask(server) == b"hello\n"
        assert server._parent.acceptor.request_path is None
    assert server.parent_calls() == []


def test_get_process_and_close_request_run_in_the_parent_finish_in_the_child(
    tmp_path: Path,
) -> None:
    def get_request(self: Recording) -> Any:
        self.note("get_request")
        return forkserver.ForkingTCPServer.get_request(self)

    def process_request(self: Recording, request: Any, client_address: Any) -> None:
        self.note("process_request")
        forkserver.ForkingTCPServer.process_request(self, request, client_address)

    def close_request(self: Recording, request: Any) -> None:
        self.note("close_request")
        forkserver.ForkingTCPServer.close_request(self, request)

    def finish_request(self: Recording, request: Any, client_address: Any) -> None:
        self.note("finish_request")
        forkserver.ForkingTCPServer.finish_request(self, request, client_address)

    server = make(
        Recording,
        tmp_path,
        get_request=get_request,
        process_request=process_request,
        close_request=close_request,
        finish_request=finish_request,
    )
    with Serving(server):
        assert ask(server) == b"hello\n"
    assert server.parent_calls() == ["get_request", "process_request", "close_request"]
    # shutdown_request closes through close_request: in the child, too.
    assert server.child_calls() == ["finish_request", "close_request"]


def test_process_request_raising_goes_to_handle_error_then_shutdown_request_in_the_parent(
    tmp_path: Path,
) -> None:
    def process_request(self: Recording, request: Any, client_address: Any) -> None:
        raise ValueError("no")

    def handle_error(self: Recording, request: Any, client_address: Any) -> None:
        self.note("handle_error")

    server = make(
        Recording,
        tmp_path,
        process_request=process_request,
        handle_error=handle_error,
        shutdown_request=_shutdown_noted,
    )
    with Serving(server):
        assert ask(server) == b""
    assert server.parent_calls() == ["handle_error", "shutdown_request"]


# -- the child's hooks -----------------------------------------------------------------


class Raising(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        raise self.server.exception  # type: ignore[attr-defined]


@pytest.mark.parametrize("hook_path", [False, True], ids=["default-path", "hook-path"])
@pytest.mark.parametrize(
    ("exception", "handled"), [(ValueError, True), (KeyboardInterrupt, False), (SystemExit, False)]
)
def test_handle_error_gets_exceptions_only_in_the_child(
    tmp_path: Path, exception: type[BaseException], handled: bool, hook_path: bool
) -> None:
    def handle_error(self: Recording, request: Any, client_address: Any) -> None:
        self.note("handle_error")

    hooks: dict[str, Any] = {"handle_error": handle_error}
    if hook_path:
        hooks["shutdown_request"] = _shutdown_noted
    cls = type("Server", (Recording,), {"log": tmp_path / "child.log", **hooks})
    server = cls((HOST, 0), Raising)
    server.exception = exception
    with Serving(server):
        assert ask(server) == b""
    expected = ["handle_error"] if handled else []
    assert server.child_calls() == expected + (["shutdown_request"] if hook_path else [])


# -- handle_request, handle_timeout, service_actions, fileno -------------------------------


def test_handle_request_serves_one_request_through_the_hooks(tmp_path: Path) -> None:
    def fileno(self: Recording) -> int:
        self.note("fileno")
        return forkserver.ForkingTCPServer.fileno(self)

    server = make(Recording, tmp_path, fileno=fileno, shutdown_request=_shutdown_noted)
    with socket.create_connection(server.server_address, timeout=10) as s:
        s.sendall(b"once\n")
        server.handle_request()
        assert s.recv(100) == b"once\n"
    server.server_close()  # block_on_close: waits for (and reaps) the child
    assert server.parent_calls() == ["fileno"]
    assert server.child_calls() == ["shutdown_request"]
    assert server.active_children is None


def test_handle_request_calls_handle_timeout_after_timeout(tmp_path: Path) -> None:
    def handle_timeout(self: Recording) -> None:
        self.note("handle_timeout")

    server = make(Recording, tmp_path, handle_timeout=handle_timeout)
    server.timeout = 0.2
    started = time.monotonic()
    server.handle_request()
    assert 0.2 <= time.monotonic() - started < 5
    server.server_close()
    assert server.parent_calls() == ["handle_timeout"]


def test_service_actions_is_called_while_serving_only_when_overridden(tmp_path: Path) -> None:
    ticked = threading.Event()

    def service_actions(self: Recording) -> None:
        self.note("service_actions")
        if len(self.calls) >= 3:
            ticked.set()

    server = make(Recording, tmp_path, service_actions=service_actions)
    with Serving(server, poll_interval=0.01):
        assert ticked.wait(10)
        assert ask(server) == b"hello\n"
        assert server._parent.acceptor.request_path is None  # not a request hook
    assert set(server.parent_calls()) == {"service_actions"}


# -- binding: server_bind, server_activate, server_close, class attributes ---------------


@pytest.mark.parametrize("base", [forkserver.Server, forkserver.ForkingTCPServer])
def test_server_bind_and_activate_overrides_run_at_construction(base: type[Any]) -> None:
    calls: list[str] = []

    class Bound(base):  # type: ignore[misc]
        def server_bind(self) -> None:
            calls.append("server_bind")
            super().server_bind()

        def server_activate(self) -> None:
            calls.append("server_activate")
            super().server_activate()

        def server_close(self) -> None:
            calls.append("server_close")
            super().server_close()

    with Bound((HOST, 0), Echo) as server:
        assert server.socket.getsockname() == server.server_address
    assert calls == ["server_bind", "server_activate", "server_close"]


def test_allow_reuse_address_is_socketservers() -> None:
    class Reusing(forkserver.ForkingTCPServer):
        allow_reuse_address = True

    for cls, expected in [(forkserver.ForkingTCPServer, 0), (Reusing, 1)]:
        with cls((HOST, 0), Echo) as server:
            got = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert bool(got) == bool(expected)


def test_forking_mixin_attributes_and_request_queue_size() -> None:
    class Small(forkserver.ForkingTCPServer):
        max_children = 3
        request_queue_size = 7

    with Small((HOST, 0), Echo) as server:
        assert (server.max_children, server.block_on_close, server.timeout) == (3, True, 300)
        assert server.settings.max_children == 3
        assert server.active_children is None
    assert forkserver.ForkingUDPServer.socket_type == socket.SOCK_DGRAM
    assert forkserver.ForkingUnixStreamServer.address_family == socket.AF_UNIX


def test_forking_mixin_refuses_a_stdlib_base() -> None:
    with pytest.raises(TypeError, match="forkserver's servers"):

        class Mixed(forkserver.ForkingMixIn, socketserver.TCPServer):
            pass


def test_a_request_hook_with_spare_children_is_a_config_error() -> None:
    class Checked(forkserver.Server):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return True

    server = Checked((HOST, 0), Echo, spare_children=1)
    try:
        with pytest.raises(ConfigError, match=r"overrides verify_request\(\).*spare_children"):
            server.serve_forever()
    finally:
        server.server_close()


# -- the exceptions a socketserver user catches -------------------------------------------


def test_an_out_of_range_port_is_an_overflow_error_and_a_config_error() -> None:
    for cls in (forkserver.Server, forkserver.ForkingTCPServer):
        with pytest.raises(OverflowError):
            cls((HOST, -1), Echo)
    with pytest.raises(ConfigError) as caught:
        forkserver.Server((HOST, 70000), Echo)
    assert isinstance(caught.value, OverflowError | ValueError)
    assert str(caught.value) == "server.port must be an integer 0-65535, got 70000"


def test_a_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_children"):
        forkserver.Server((HOST, 0), Echo, max_children=0)


def test_a_bind_failure_is_an_os_error_with_its_errno() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as caught:
            forkserver.Server((HOST, port), Echo, **{})
        assert isinstance(caught.value, BindError)
        assert caught.value.errno == errno.EADDRINUSE
        assert str(caught.value) == f"cannot listen on {HOST}:{port}: Address already in use"
        with pytest.raises(OSError) as raw:  # socketserver's own bind(): the kernel's error
            forkserver.ForkingTCPServer((HOST, port), Echo)
        assert raw.value.errno == errno.EADDRINUSE


# -- datagrams through the hooks --------------------------------------------------------


class DatagramEcho(socketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read())


@pytest.mark.parametrize("family", ["udp", "unix"])
def test_verify_request_decides_for_each_datagram(tmp_path: Path, family: str) -> None:
    def verify(self: Any, request: Any, client_address: Any) -> bool:
        data, sock = request
        assert sock is self.socket  # the request is (data, the server's socket)
        return bool(data != b"no")

    base: type[Any] = (
        forkserver.ForkingUDPServer if family == "udp" else forkserver.ForkingUnixDatagramServer
    )
    cls = type("Checked", (base,), {"verify_request": verify})
    address: Any = (HOST, 0) if family == "udp" else str(tmp_path / "server.sock")
    server = cls(address, DatagramEcho)
    kind = socket.AF_INET if family == "udp" else socket.AF_UNIX
    with Serving(server), socket.socket(kind, socket.SOCK_DGRAM) as client:
        if family == "unix":
            client.bind(str(tmp_path / "client.sock"))
        client.settimeout(10)
        client.sendto(b"no", server.server_address)
        client.sendto(b"yes", server.server_address)
        assert client.recv(100) == b"yes"  # and nothing for b"no": the next is b"again"
        client.sendto(b"again", server.server_address)
        assert client.recv(100) == b"again"
        assert server._parent.acceptor.request_path is not None


def test_allow_reuse_address_false_on_server_is_honoured() -> None:
    class NoReuse(forkserver.Server):
        allow_reuse_address = False

    for cls, expected in [(forkserver.Server, True), (NoReuse, False)]:
        with cls((HOST, 0), Echo) as server:
            got = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert bool(got) == expected


# -- the stop's drain goes through the hooks too --------------------------------------

_GATED = """
import socketserver
import forkserver

class Gate(forkserver.ForkingTCPServer):
    max_children = 1
    allowed = 1

    def verify_request(self, request, client_address):
        self.allowed -= 1
        return self.allowed >= 0  # the first connection only

class Hello(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"hi\\n")
        self.wfile.write(self.rfile.readline())

server = Gate(("127.0.0.1", 0), Hello)
print("ready", server.server_address[1], flush=True)
server.serve_forever()
server.server_close()
print("stopped", flush=True)
"""


def test_connections_drained_at_a_graceful_stop_still_pass_verify_request(
    tmp_path: Path,
) -> None:
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "gated.py"
    script.write_text(_GATED)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        first = socket.create_connection((HOST, port), timeout=10)
        assert first.recv(3) == b"hi\n"  # served: the one child there may be
        second = socket.create_connection((HOST, port), timeout=10)  # waits in the backlog
        proc.send_signal(signal.SIGTERM)  # the drain takes it: verify_request says no
        assert second.recv(100) == b""
        first.sendall(b"bye\n")
        assert first.recv(100) == b"bye\n"
        first.close()
        second.close()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 0, err
    assert out == "stopped\n"


def test_handle_error_gets_a_datagrams_request_as_the_handler_did(tmp_path: Path) -> None:
    class Failing(socketserver.DatagramRequestHandler):
        def handle(self) -> None:
            raise ValueError("no")

    class Noting(forkserver.ForkingUDPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            data, sock = request
            sock.sendto(b"error for " + data, client_address)

    server = Noting((HOST, 0), Failing)
    with Serving(server), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(b"ping", server.server_address)
        assert client.recv(100) == b""  # finish() sends what was written, in a finally
        assert client.recv(100) == b"error for ping"


def test_the_hook_path_writes_the_access_line(tmp_path: Path) -> None:
    import logging

    class Checked(forkserver.Server):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return True

    # Embedded, forkserver logs through stdlib logging; the child writes the line.
    access = logging.getLogger("forkserver.access")
    handler = logging.FileHandler(tmp_path / "access.log")
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        server = Checked((HOST, 0), Echo, access_log=True)
        with Serving(server):
            assert ask(server, b"0123456789\n") == b"0123456789\n"
    finally:
        access.removeHandler(handler)
        handler.close()
    [line] = (tmp_path / "access.log").read_text().splitlines()
    assert line.startswith(f"forkserver.access {HOST}:"), line
    assert " in 11 out 11 exit status 0; cpu " in line, line  # and what it cost
