"""The scrape child's HTTP/1.0 responder: one request, one answer, then close.

Only what a scraper and ``forkserver status`` send is understood: ``GET``
or ``HEAD`` of a known path.  The request head is read within a timeout,
the body (if any) is never read, and the close does not reset an answer
the client has not read yet.
"""

from __future__ import annotations

import socket
import time

from .prometheus import CONTENT_TYPE, JSON_TYPE, render_children, render_prometheus

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .snapshot import Snapshot

__all__ = ["CHILDREN_PATH", "HEALTHZ_PATH", "METRICS_PATH", "TIMEOUT", "serve_metrics"]

METRICS_PATH = "/metrics"
CHILDREN_PATH = "/children"
HEALTHZ_PATH = "/healthz"
TIMEOUT = 5.0  # for the whole request head, and again for sending the answer
MAX_HEAD = 8192  # request line and headers; nothing else is read
LINGER = 1.0  # at most this long reading what a client sent beyond that
MAX_LINGER = 1 << 20


def _read_head(conn: socket.socket, deadline: float) -> bytes:
    """The request line and headers (up to MAX_HEAD bytes, or what came before
    EOF); raises TimeoutError at *deadline*."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_HEAD:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(MAX_HEAD - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _answer(conn: socket.socket, snap: Snapshot, timeout: float) -> int:
    try:
        head = _read_head(conn, time.monotonic() + timeout)
    except TimeoutError:
        return _respond(conn, 408, "Request Timeout", timeout)
    line, newline, _ = head.partition(b"\n")
    parts = line.rstrip(b"\r").split()
    if (
        not newline
        or len(parts) != 3
        or not parts[2].startswith(b"HTTP/")
        or not parts[1].isascii()
    ):
        return _respond(conn, 400, "Bad Request", timeout)
    method, target = parts[0], parts[1].decode("ascii")
    if method not in (b"GET", b"HEAD"):
        return _respond(conn, 405, "Method Not Allowed", timeout, allow=True)
    path, head_only = target.partition("?")[0], method == b"HEAD"
    if path == HEALTHZ_PATH:
        # For a load balancer or an orchestrator: take this one out of
        # rotation from the moment it begins to drain.
        if snap["stopping"]:
            status, reason, body = 503, "Service Unavailable", "stopping\n"
        else:
            status, reason, body = 200, "OK", "serving\n"
        return _respond(conn, status, reason, timeout, body, head_only=head_only)
    if path == METRICS_PATH:
        body, ctype = render_prometheus(snap), CONTENT_TYPE
    elif path == CHILDREN_PATH:
        body, ctype = render_children(snap), JSON_TYPE
    else:
        return _respond(conn, 404, "Not Found", timeout)
    return _respond(conn, 200, "OK", timeout, body, ctype, head_only=head_only)


def _respond(
    conn: socket.socket,
    status: int,
    reason: str,
    timeout: float,
    body: str | None = None,
    ctype: str = "text/plain; charset=utf-8",
    head_only: bool = False,
    allow: bool = False,
) -> int:
    if body is None:
        paths = f"{METRICS_PATH}, GET {CHILDREN_PATH} or GET {HEALTHZ_PATH}"
        body = f"{status} {reason}: try GET {paths}\n"
    # Peers can be Unix socket paths, which may hold any bytes.
    data = body.encode("utf-8", "backslashreplace")
    head = (
        f"HTTP/1.0 {status} {reason}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(data)}\r\n"
        + ("Allow: GET, HEAD\r\n" if allow else "")
        + "Connection: close\r\n\r\n"
    )
    conn.settimeout(timeout)
    conn.sendall(head.encode("ascii") + (b"" if head_only else data))
    return status


def serve_metrics(conn: socket.socket, snap: Snapshot, timeout: float = TIMEOUT) -> int:
    """Answer one HTTP request on *conn* from *snap*, then close *conn*.

    ``GET /metrics`` (Prometheus text), ``GET /children`` (JSON),
    ``GET /healthz`` (200 while serving, 503 once *snap* says the parent is
    stopping), HEAD of each; 404 for another path, 405 for another method, 400 for a request
    that is not HTTP, 408 when the request head is not in within *timeout*.
    Returns the status sent, or 0 when the client went away first.
    """
    try:
        return _answer(conn, snap, timeout)
    except OSError:  # reset, or too slow to take the answer: nobody to tell
        return 0
    finally:
        _close(conn)


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_WR)
        # Closing with unread input sends a reset, which can destroy the
        # answer before the client has read it.  The usual client sent only
        # the request head: nothing is left, and this is one recv.  Otherwise
        # read until it stops sending, within LINGER and MAX_LINGER bytes.
        conn.setblocking(False)
        pending = conn.recv(MAX_LINGER)  # BlockingIOError: nothing was left unread
        drained, deadline = len(pending), time.monotonic() + LINGER
        while pending and drained < MAX_LINGER and (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            pending = conn.recv(MAX_LINGER)
            drained += len(pending)
    except OSError:
        pass  # reset by the peer, nothing pending, or LINGER is over
    conn.close()
