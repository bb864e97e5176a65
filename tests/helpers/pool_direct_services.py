"""Handlers for the tests of spares accepting by themselves; imported by the
server as ``tests.helpers.pool_direct_services:NAME``."""

from __future__ import annotations

import os
import socket
from typing import Any


def pid_addr_echo(conn: socket.socket, addr: Any) -> None:
    """Greets with b"PID REPR(client_address)\\n", then echoes until EOF."""
    conn.sendall(f"{os.getpid()} {addr!r}\n".encode())
    while data := conn.recv(65536):
        conn.sendall(data)


def tagged_pid_echo(conn: socket.socket, addr: Any) -> None:
    """Greets with b"own PID\\n" (to tell a listener's own handler from the
    server's), then echoes until EOF."""
    conn.sendall(f"own {os.getpid()}\n".encode())
    while data := conn.recv(65536):
        conn.sendall(data)
