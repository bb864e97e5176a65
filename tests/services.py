"""Handlers the tests serve; imported by the server as ``tests.services:NAME``."""

from __future__ import annotations

import os
import socket
from typing import Any

from forkserver import BaseHandler, StreamHandler


class Raising(BaseHandler):
    """Sends a greeting, then raises: the child must log it and exit 1."""

    def handle(self) -> None:
        self.request.sendall(b"about to fail\n")
        raise RuntimeError("deliberate failure in handler")


class PidEcho(StreamHandler):
    """Replies with its pid, then echoes lines until EOF (to tell children apart)."""

    def handle(self) -> None:
        self.wfile.write(f"{os.getpid()}\n".encode())
        for line in self.rfile:
            self.wfile.write(line)


def echo_function(conn: socket.socket, addr: Any) -> None:
    """A plain-function handler: echo until the peer closes."""
    while data := conn.recv(65536):
        conn.sendall(data)


def exit_with_status(conn: socket.socket, addr: Any) -> None:
    """Exits with the status the client sends as one line."""
    raise SystemExit(int(conn.recv(64).strip() or b"0"))
