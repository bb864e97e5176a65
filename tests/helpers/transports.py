"""Listeners of every kind in one config: ``[[listen]]`` tables, the addresses
the server reports for them, and plain clients over TCP, UDP and Unix sockets."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

from forkserver.testing.config import toml_value
from tests.helpers.processes import children_gone, group_members, idle_children
from tests.helpers.servers import ABNORMAL_EXIT, ServerProcess, StartServer, wait_until

ECHO = "forkserver.examples.echo:EchoHandler"


DATAGRAM_ECHO = "forkserver.examples.echo:DatagramEchoHandler"


SERVICES = "tests.helpers.transport_services"


PROXY_REPORT = f"{SERVICES}:proxy_report"


TLS_LINE = f"{SERVICES}:TlsLine"


def listen(**settings: Any) -> str:
    """One ``[[listen]]`` table, as TOML text."""
    return "[[listen]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())


def server_table(**settings: Any) -> str:
    """A ``[server]`` table (without host/port: the listeners say where)."""
    return "[server]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def tcp_at(server: ServerProcess, index: int) -> tuple[str, int]:
    address = server.listening[index]
    assert not address.startswith(("udp:", "unix:")), server.listening
    return host_port(address)


def udp_at(server: ServerProcess, index: int) -> tuple[str, int]:
    address = server.listening[index]
    assert address.startswith("udp:"), server.listening
    return host_port(address.removeprefix("udp:"))


def unix_at(server: ServerProcess, index: int) -> str:
    address = server.listening[index]
    assert address.startswith("unix:"), server.listening
    return address.removeprefix("unix:")


def listening_line(server: ServerProcess, index: int) -> str:
    """The whole "listening on ..." log line of listener *index* (with its suffix)."""
    lines = [line for line in server.lines if "listening on " in line]
    assert len(lines) == len(server.listening), server.log
    return lines[index].split("listening on ", 1)[1]


def stop_cleanly(server: ServerProcess) -> None:
    children_gone(server)
    assert server.stop() == 0, server.log
    assert not ABNORMAL_EXIT.search(server.log), server.log


def unserved(sock: socket.socket, payload: bytes = b"") -> bytes:
    """Send *payload*, half-close, and return what came back before the close.

    A connection closed with unread data may end in a reset rather than EOF:
    both are a close; what matters is that nothing was sent back."""
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return b""
    return read_until_closed(sock)


def read_until_closed(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Everything received until EOF or a reset."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"not closed within {timeout}s; got {received!r}") from None
    return received


def udp_client(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(10)
    sock.bind((host, 0))
    return sock


DATAGRAM_HOLD = f"{SERVICES}:datagram_hold"


def udp_ask(target: tuple[str, int], payload: bytes) -> bytes:
    with udp_client() as client:
        client.sendto(payload, target)
        reply, source = client.recvfrom(65536)
    assert source == target
    return reply


def open_fifo_writer(path: Path, timeout: float = 10.0) -> int:
    """Open FIFO *path* for writing once a reader has it open (a held child)."""
    fd = -1

    def opened() -> bool:
        nonlocal fd
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            return False
        return True

    wait_until(opened, timeout, f"a child to open {path}")
    return fd


def stop_clean(server: ServerProcess, settings: dict[str, Any]) -> None:
    """stop_cleanly(), also with spare_children (whose idle spares never go):
    only the spares left, a clean exit, nothing left in the process group."""
    if not settings.get("spare_children"):
        stop_cleanly(server)
        return
    idle_children(server, settings)
    assert server.stop() == 0, server.log
    assert not ABNORMAL_EXIT.search(server.log), server.log
    wait_until(lambda: not group_members(server.pid), 10, "the spares to exit")


def hold_one_datagram(
    start_server: StartServer, tmp_path: Path, when_full: str
) -> tuple[ServerProcess, tuple[str, int], socket.socket, int]:
    """A server at max_children = 1, its only child held on a FIFO: returns
    the server, its UDP address, the client that sent the held datagram and
    the FIFO's write end (closing it lets the child reply and exit)."""
    fifo = tmp_path / "hold.fifo"
    os.mkfifo(fifo)
    server = start_server(
        server_table(max_children=1, when_full=when_full)
        + listen(udp="127.0.0.1:0", handler=DATAGRAM_HOLD)
    )
    target = udp_at(server, 0)
    client = udp_client()
    client.sendto(b"hold " + str(fifo).encode(), target)
    writer = open_fifo_writer(fifo)  # the child runs, and waits for the writer's EOF
    assert len(server.children()) == 1
    return server, target, client, writer


def pid_reply(client: socket.socket) -> tuple[int, bytes]:
    reply, _ = client.recvfrom(65536)
    pid, _, data = reply.partition(b" ")
    return int(pid), data
