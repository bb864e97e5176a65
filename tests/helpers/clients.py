"""Clients on loopback: connect, send, read to EOF, and what waits in kernel queues."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from forkserver.testing.process import connect

__all__ = [
    "accept_queue_length",
    "connect",
    "echo_roundtrip",
    "needs_ipv6",
    "occupy_port",
    "read_pid_greeting",
    "recv_to_eof",
    "recv_until",
    "send_and_read",
    "udp_queued_bytes",
]


def echo_roundtrip(address: Any, payload: bytes, timeout: float = 20.0) -> bytes:
    """Connect, send *payload*, half-close, and read the reply to EOF."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    if isinstance(address, tuple) and ":" in address[0]:
        family = socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sender = threading.Thread(target=_send_and_half_close, args=(sock, payload))
        sender.start()
        chunks = []
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
        sender.join(timeout)
        return b"".join(chunks)


def send_and_read(sock: socket.socket, payload: bytes) -> bytes:
    """On an open connection: send *payload*, half-close, read the reply to EOF."""
    sender = threading.Thread(target=_send_and_half_close, args=(sock, payload))
    sender.start()
    try:
        return recv_to_eof(sock)
    finally:
        sender.join(10)


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(
    not _has_ipv6_loopback(), reason="no IPv6 loopback: cannot bind ::1 on this machine"
)


def _send_and_half_close(sock: socket.socket, payload: bytes) -> None:
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def recv_until(sock: socket.socket, delimiter: bytes, limit: int = 1 << 16) -> bytes:
    """Read until *delimiter* has arrived; returns everything read (bounded by *limit*)."""
    data = b""
    while delimiter not in data:
        if len(data) > limit:
            raise AssertionError(f"no {delimiter!r} in the first {len(data)} bytes: {data[:80]!r}")
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"EOF before {delimiter!r}; got {data!r}")
        data += chunk
    return data


def recv_to_eof(sock: socket.socket, timeout: float = 20.0) -> bytes:
    """Read until the peer closes; each recv is bounded by the socket's timeout."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
    raise AssertionError(f"no EOF within {timeout}s")


def accept_queue_length(port: int) -> int:
    """Connections waiting in the accept queue of the TCP listener on *port*.

    For a listening socket (state 0A), the rx_queue column of
    /proc/net/tcp{,6} is the number of established connections not yet
    accepted.
    """
    return _rx_queue("tcp", port, "0A")


def udp_queued_bytes(port: int) -> int:
    """Bytes waiting in the receive queue of the UDP socket bound to *port*."""
    return _rx_queue("udp", port)


def _rx_queue(protocol: str, port: int, state: str | None = None) -> int:
    """The rx_queue column of /proc/net/PROTOCOL{,6}, summed over the sockets
    bound to local *port* (in *state*, if given)."""
    total = 0
    for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
        try:
            with open(table) as fp:
                rows = fp.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, row_state, queues = fields[1], fields[3], fields[4]
            if state is not None and row_state != state:
                continue
            if int(local.rpartition(":")[2], 16) == port:
                total += int(queues.partition(":")[2], 16)
    return total


def occupy_port() -> socket.socket:
    """A socket listening on 127.0.0.1 at a kernel-chosen port, so that port is taken.

    Use as ``with occupy_port() as sock: port = sock.getsockname()[1]``.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def read_pid_greeting(sock: socket.socket) -> int:
    """The pid a PidEcho-style handler greets with (proof the client was served)."""
    return int(recv_until(sock, b"\n").split(b"\n", 1)[0])
