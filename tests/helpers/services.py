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


# --- used by issue 4 tests ---
# Imported here, not at the top, because this block is appended to a shared file.
# Children that run as another user (server.user) may not be able to read the
# interpreter's files, so they must import nothing after fork: everything the
# handlers below use is imported here, in the parent.

import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

_LIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "nofile": resource.RLIMIT_NOFILE,
    "core": resource.RLIMIT_CORE,
}


def _read_line(conn: socket.socket, limit: int = 4096) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.strip()


def report(conn: socket.socket, addr: Any) -> None:
    """Reads one line (a file path, or empty), then replies one JSON line: who
    the child runs as, its rlimits and umask; with a path, it creates that file
    (mode 0o666 before the umask) and reports the file's mode too."""
    path = _read_line(conn).decode()
    mode = None
    if path:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    facts = {
        "pid": os.getpid(),
        "resuid": os.getresuid(),
        "resgid": os.getresgid(),
        "groups": os.getgroups(),
        "umask": umask,
        "mode": mode,
        **{name: resource.getrlimit(kind) for name, kind in _LIMITS.items()},
    }
    conn.sendall(json.dumps(facts).encode() + b"\n")


def greet_then_sleep(conn: socket.socket, addr: Any) -> None:
    """Greets with its pid, then sleeps (60 s at most) without reading or writing."""
    conn.sendall(f"{os.getpid()}\n".encode())
    time.sleep(60)


def write_64_mib(conn: socket.socket, addr: Any) -> None:
    """Greets with its pid, then writes 64 MiB to a client that may never read them."""
    conn.sendall(f"{os.getpid()}\n".encode())
    chunk = b"x" * (1 << 20)
    for _ in range(64):
        conn.sendall(chunk)


def burn_cpu(conn: socket.socket, addr: Any) -> None:
    """Greets with its pid, then spins (for 60 s of CPU time at most)."""
    conn.sendall(f"{os.getpid()}\n".encode())
    deadline = time.process_time() + 60
    while time.process_time() < deadline:
        pass


def allocate(conn: socket.socket, addr: Any) -> None:
    """Reads a size in MiB, allocates and touches that much, replies b"ok N"."""
    mib = int(_read_line(conn))
    block = bytearray(mib << 20)
    conn.sendall(f"ok {len(block) >> 20}\n".encode())


def pid_then_echo(conn: socket.socket, addr: Any) -> None:
    """Greets with its pid, then echoes with plain recv/sendall until EOF."""
    conn.sendall(f"{os.getpid()}\n".encode())
    while data := conn.recv(65536):
        conn.sendall(data)


class ReadTen(StreamHandler):
    """Reads exactly 10 bytes through rfile and says how many it got."""

    def handle(self) -> None:
        data = self.rfile.read(10) or b""
        self.wfile.write(f"got {len(data)}\n".encode())


def report_inheritable(conn: socket.socket, addr: Any) -> None:
    """Says whether the connection's fd would survive an exec (it must not)."""
    conn.sendall(f"inheritable={os.get_inheritable(conn.fileno())}\n".encode())


def report_fds(conn: socket.socket, addr: Any) -> None:
    """Replies one JSON line: its pid, client_address, and for each descriptor
    it holds besides stdio and the connection, what it is (a listening socket
    shows as "listening")."""
    held = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == conn.fileno():
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listdir's own descriptor, closed already
        if target.startswith("socket:"):
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    target = "listening"
        held[fd] = target
    reply = {"pid": os.getpid(), "addr": addr, "fds": held}
    conn.sendall(json.dumps(reply).encode() + b"\n")


class FaultyEcho(BaseHandler):
    """An echo that fails on purpose, by the first byte of the connection:
    0-63 flips a byte, 64-127 drops everything after the first chunk, else echoes."""

    def handle(self) -> None:
        conn = self.request
        first = conn.recv(65536)
        if not first:
            return
        dropping = 64 <= first[0] < 128
        if first[0] < 64:
            first = bytes([first[0] ^ 0xFF]) + first[1:]
        conn.sendall(first)
        while data := conn.recv(65536):
            if not dropping:
                conn.sendall(data)


def costly(conn: socket.socket, addr: Any) -> None:
    """Reads "SECONDS MIB": spins for that much CPU time, allocates and touches
    that many MiB, replies with its pid, then holds them until the client's EOF."""
    seconds, mib = _read_line(conn).split()
    deadline = time.process_time() + float(seconds)
    while time.process_time() < deadline:
        pass
    block = bytearray(int(mib) << 20)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # every page resident
    conn.sendall(f"{os.getpid()}\n".encode())
    while conn.recv(4096):
        pass


def fd_then_wait(conn: socket.socket, addr: Any) -> None:
    """Replies its connection's descriptor number, then waits (60 s at most) for EOF."""
    conn.sendall(f"{conn.fileno()}\n".encode())
    conn.settimeout(60)
    while conn.recv(4096):
        pass
