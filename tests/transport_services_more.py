"""Handlers for tests/test_transports_more.py; imported by the server as
``tests.transport_services_more:NAME``.

Each one replies with what it saw (its client_address, the pid of the parent
that forked it) so that a test can assert on exact bytes.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def _read_to_eof(conn: socket.socket) -> bytes:
    chunks = []
    while data := conn.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def datagram_hold(request: tuple[bytes, socket.socket], client_address: Any) -> None:
    """Replies b"PID DATA"; a datagram b"hold PATH" first opens the FIFO at
    PATH and reads it to EOF, so the test decides when this child may finish
    (and knows it runs: the test's open() of the write end waits for it)."""
    data, sock = request
    if data.startswith(b"hold "):
        with open(data[5:].decode(), "rb") as fifo:
            fifo.read()
    sock.sendto(b"%d %s" % (os.getpid(), data), client_address)


def datagram_parent(request: tuple[bytes, socket.socket], client_address: Any) -> None:
    """Replies b"PPID DATA": which parent forked the child that served it."""
    data, sock = request
    sock.sendto(b"%d %s" % (os.getppid(), data), client_address)


def parent_report(conn: socket.socket, client_address: Any) -> None:
    """Reads to EOF, then replies b"PPID HOST PORT\\n" and what it read: the
    parent that forked this child and the client_address it was given."""
    data = _read_to_eof(conn)
    host, port = client_address[0], client_address[1]
    conn.sendall(f"{os.getppid()} {host} {port}\n".encode() + data)


def address_repr(conn: socket.socket, client_address: Any) -> None:
    """Reads to EOF, then replies repr(client_address) and a newline: the exact
    value the handler got, tuple length included."""
    _read_to_eof(conn)
    conn.sendall(f"{client_address!r}\n".encode())
