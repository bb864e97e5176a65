"""Handlers for tests/test_deadlines.py: each style of sending a big reply, a
request reader, one that reports its socket's class, and one with its own
socketserver-style timeout."""

from __future__ import annotations

import os
import socket
from typing import Any

from forkserver import StreamHandler

BIG = 32 << 20  # far more than any socket buffer: the send must wait on the client


def sendall_big(conn: socket.socket, addr: Any) -> None:
    """A function handler: its pid, then one sendall() of BIG bytes."""
    conn.sendall(f"{os.getpid()}\n".encode())
    conn.sendall(b"x" * BIG)


class WfileBig(StreamHandler):
    """A class handler (unbuffered wfile, as socketserver's): pid, then BIG bytes."""

    def handle(self) -> None:
        self.wfile.write(f"{os.getpid()}\n".encode())
        self.wfile.write(b"x" * BIG)


class BufferedWfileBig(WfileBig):
    """The same through a buffered makefile("wb") writer, flushed at the end."""

    wbufsize = 1 << 16

    def handle(self) -> None:
        super().handle()
        self.wfile.flush()


class ReadLines(StreamHandler):
    """Its pid, then echoes each line read (rfile) until EOF."""

    def handle(self) -> None:
        self.wfile.write(f"{os.getpid()}\n".encode())
        for line in self.rfile:
            self.wfile.write(line)


def line_echo(conn: socket.socket, addr: Any) -> None:
    """A function handler: its pid, then echoes each line, read with recv()."""
    conn.sendall(f"{os.getpid()}\n".encode())
    pending = b""
    while data := conn.recv(4096):
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            conn.sendall(line + b"\n")


def socket_class(conn: socket.socket, addr: Any) -> None:
    """Replies with the class of the socket the handler was given."""
    kind = type(conn)
    conn.sendall(f"{kind.__module__}.{kind.__qualname__}\n".encode())


class OwnTimeout(StreamHandler):
    """socketserver's way: a handler ``timeout``; its pid, then waits for a line."""

    timeout = 1

    def handle(self) -> None:
        self.wfile.write(f"{os.getpid()}\n".encode())
        self.wfile.write(self.rfile.readline())
