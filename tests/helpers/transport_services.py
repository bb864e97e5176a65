"""Handlers for the transport tests (UDP, TLS, PROXY protocol, HAProxy);
imported by the server as ``tests.helpers.transport_services:NAME``.

Each one replies with what it saw of its request, so that a test can assert
on exact bytes what the server handed to the handler.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from forkserver import BaseHandler, StreamHandler
from forkserver.handlers import DatagramHandler

# -- UDP ------------------------------------------------------------------------------


def datagram_pid_echo(request: tuple[bytes, socket.socket], client_address: Any) -> None:
    """A plain-function datagram handler: reply b"PID DATA" to the sender."""
    data, sock = request
    sock.sendto(b"%d %s" % (os.getpid(), data), client_address)


class DatagramPidEcho(DatagramHandler):
    """The socketserver.DatagramRequestHandler way: read rfile, write wfile.

    The reply is written in three pieces: they must leave as one datagram,
    b"PID DATA", when handle() returns."""

    def handle(self) -> None:
        data = self.rfile.read()
        self.wfile.write(b"%d" % os.getpid())
        self.wfile.write(b" ")
        self.wfile.write(data)


# -- PROXY protocol -------------------------------------------------------------------


def _read_to_eof(conn: socket.socket) -> bytes:
    chunks = []
    while data := conn.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def proxy_report(conn: socket.socket, client_address: Any) -> None:
    """Reads to EOF, then replies b"HOST PORT\\n" (its client_address) and
    every byte it read: what a PROXY listener left for the handler."""
    data = _read_to_eof(conn)
    host, port = _host_port(client_address)
    conn.sendall(f"{host} {port}\n".encode() + data)


def _host_port(client_address: Any) -> tuple[str, str]:
    if isinstance(client_address, tuple):
        return str(client_address[0]), str(client_address[1])
    return repr(client_address), "-"  # a Unix-socket peer


def _read_line(conn: Any) -> bytes:
    """Bytes up to and including the first newline (TCP is a stream: it may
    take several recv calls), or all there was before EOF."""
    line = b""
    while not line.endswith(b"\n"):
        data = conn.recv(4096)
        if not data:
            break
        line += data
    return line


# -- TLS ------------------------------------------------------------------------------


class TlsLine(BaseHandler):
    """Reads one line, then replies b"TYPE VERSION PEER_CN HOST PORT\\n" and the line.

    TYPE is the class of the request (ssl.SSLSocket on a TLS listener),
    VERSION its TLS version, PEER_CN the common name of the client
    certificate ("-" without one), HOST PORT the client_address.
    """

    def handle(self) -> None:
        conn = self.request
        line = _read_line(conn)
        version = conn.version() if hasattr(conn, "version") else None
        cert = conn.getpeercert() if hasattr(conn, "getpeercert") else None
        peer_cn = "-"
        for rdn in (cert or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    peer_cn = value
        host, port = _host_port(self.client_address)
        header = f"{type(conn).__name__} {version or '-'} {peer_cn} {host} {port}\n"
        conn.sendall(header.encode() + line)


# -- HAProxy --------------------------------------------------------------------------


def tagged_reply(conn: socket.socket, client_address: Any) -> None:
    """Reads one line; replies b"TAG HOST PORT LINE" (TAG from $TRANSPORT_TEST_TAG).

    A connection that sends nothing (an HAProxy health check) gets nothing."""
    line = _read_line(conn)
    if not line:
        return
    host, port = _host_port(client_address)
    tag = os.environ.get("TRANSPORT_TEST_TAG", "-")
    conn.sendall(f"{tag} {host} {port} ".encode() + line)


# -- the socket under a PROXY header ----------------------------------------------------


class SocketReport(StreamHandler):
    """Replies b"FAMILY SOCKNAME PEERNAME HOST PORT\\n": what the request socket
    really is (the connection from the proxy), then the client_address.

    disable_nagle_algorithm sets TCP_NODELAY on anything but a Unix socket,
    so it trusts request.family to say which the socket is."""

    disable_nagle_algorithm = True

    def handle(self) -> None:
        conn = self.request
        host, port = _host_port(self.client_address)
        report = f"{conn.family.name} {conn.getsockname()!r} {conn.getpeername()!r} {host} {port}\n"
        self.wfile.write(report.encode())


# -- replies naming the parent and the client address the child was given -----------


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
