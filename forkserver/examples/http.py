"""A tiny HTTP/1.0 responder: subclassing StreamHandler for a line protocol.

One request per connection (every response carries ``Connection: close``), so
curl and wrk can drive it.  Bad input never hangs the child: request lines and
headers are bounded in length and count, every read has a timeout, and
anything malformed gets an error status and a closed connection.
"""

from __future__ import annotations

import os
import socket
import time

from forkserver import StreamHandler

MAX_LINE = 8192  # bytes in the request line or one header line
MAX_HEADERS = 100
METHODS = ("GET", "HEAD")


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class HTTPHandler(StreamHandler):
    """Answers ``GET /`` (and any path) with a short text page; HEAD too."""

    timeout = 10.0  # a client that stops sending cannot pin the child
    server_version = "forkserver-example/0.1"

    def setup(self) -> None:
        # Our own timeout replaces the server's idle_timeout on this socket:
        # keep whichever is shorter.
        idle = getattr(getattr(self.server, "settings", None), "idle_timeout", 0)
        if idle:
            self.timeout = min(self.timeout, idle)
        super().setup()

    def handle(self) -> None:
        try:
            method, path = self.read_request()
        except BadRequest as exc:
            self.respond(exc.status, exc.reason, f"{exc.status} {exc.reason}\n".encode())
            self.linger()
            return
        except TimeoutError:
            self.respond(408, "Request Timeout", b"408 Request Timeout\n")
            return
        body = self.page(path)
        self.respond(200, "OK", body, send_body=method == "GET")

    def page(self, path: str) -> bytes:
        """The body for *path*; override to serve something else."""
        return f"hello from pid {os.getpid()}, you asked for {path}\n".encode()

    def read_line(self) -> bytes:
        line = self.rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise BadRequest(431, "Request Header Fields Too Large")
        return line

    def read_request(self) -> tuple[str, str]:
        """Parse the request line and skip the headers; raise BadRequest."""
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            raise BadRequest(400, "Bad Request")  # closed before a request
        if len(line) > MAX_LINE:
            raise BadRequest(414, "URI Too Long")
        try:
            method, path, version = line.decode("ascii").split()
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(400, "Bad Request") from None
        if not version.startswith("HTTP/1.") or not path.startswith("/"):
            raise BadRequest(400, "Bad Request")
        if method not in METHODS:
            raise BadRequest(501, "Not Implemented")
        for _ in range(MAX_HEADERS):
            header = self.read_line()
            if header in (b"\r\n", b"\n"):
                return method, path
            if not header:
                raise BadRequest(400, "Bad Request")  # EOF inside the headers
        raise BadRequest(431, "Request Header Fields Too Large")

    def respond(self, status: int, reason: str, body: bytes, send_body: bool = True) -> None:
        date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
        head = (
            f"HTTP/1.0 {status} {reason}\r\n"
            f"Server: {self.server_version}\r\n"
            f"Date: {date}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            self.wfile.write(head + body if send_body else head)
        except OSError:
            pass  # the client is gone; nothing to tell it

    def linger(self, limit: int = 1 << 16) -> None:
        """After an error reply, read (and drop) what the client still sends,
        briefly: closing with unread input makes the kernel send RST, which can
        destroy the error reply before the client reads it."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            while limit > 0 and (data := self.connection.recv(min(limit, 65536))):
                limit -= len(data)
        except OSError:
            pass
