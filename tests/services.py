"""Handlers the tests serve; imported by the server as ``tests.services:NAME``."""

from __future__ import annotations

import logging
import os
import signal
import socket
import socketserver
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


# --- used by test_server.py / test_listeners.py ---

# Appended rather than merged into the imports above: this block is append-only.


class IgnoreTerm(BaseHandler):
    """Ignores SIGTERM, says "ready", then waits for EOF: only SIGKILL ends it early."""

    def handle(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.request.sendall(b"ready\n")
        while self.request.recv(4096):
            pass


def bye_and_return(conn: socket.socket, addr: Any) -> None:
    """Sends b"bye" and returns without closing: the child must close for it."""
    conn.sendall(b"bye")


def pid_then_linger(conn: socket.socket, addr: Any) -> None:
    """Greets with its pid and reads one line: b"exit" returns at once; anything
    else gets b"bye", then the descriptor is closed without shutdown() and the
    child stays alive (up to 60 s, or until SIGTERM).

    With no shutdown() the FIN goes out only when the last copy of the
    descriptor is closed: the client sees EOF while this child lives only if no
    other process (the parent, a sibling) holds a copy of the connection.
    """
    conn.sendall(f"{os.getpid()}\n".encode())
    if conn.recv(64).strip() == b"exit":
        return
    conn.sendall(b"bye")
    os.close(conn.detach())
    idle, _ = socket.socketpair()
    idle.settimeout(60)
    idle.recv(1)  # nothing ever arrives: wait here until SIGTERM (or 60 s)


# --- used by test_cli.py / test_handlers.py ---
# Imported here, not at the top, because this block is appended to a shared file.

_log = logging.getLogger(__name__)

DEBUG_RECORD = "debug-echo: a DEBUG record"
WARNING_RECORD = "debug-echo: a WARNING record"


class SocketserverEcho(socketserver.BaseRequestHandler):
    """A stock socketserver handler, unchanged: echo bytes until the peer closes."""

    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class SocketserverLineEcho(socketserver.StreamRequestHandler):
    """A stock socketserver stream handler, unchanged: echo line by line via rfile/wfile."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class LineEcho(StreamHandler):
    """forkserver's own StreamHandler: echo line by line via rfile/wfile."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class AddressReply(BaseHandler):
    """Replies "CLIENT_HOST CLIENT_PORT SERVER_PORT": the (request, client_address, server) call."""

    def handle(self) -> None:
        host, port = self.client_address[0], self.client_address[1]
        self.request.sendall(f"{host} {port} {self.server.server_address[1]}\n".encode())


class DebugEcho(BaseHandler):
    """Logs DEBUG_RECORD then WARNING_RECORD (in that order), then echoes until EOF.

    The WARNING record is the marker that the DEBUG one, if enabled, was written.
    """

    def handle(self) -> None:
        _log.debug(DEBUG_RECORD)
        _log.warning(WARNING_RECORD)
        while data := self.request.recv(65536):
            self.request.sendall(data)
