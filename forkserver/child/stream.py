"""Serve one connection: timeouts, the TLS handshake, the handler, EOF, the access line."""

from __future__ import annotations

import os
import socket
import time

from ..addresses import format_address
from .tcp_info import byte_counts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..service import Service
    from .limits import ChildLimits

__all__ = ["access_line", "close_connection", "serve"]


def close_connection(conn: socket.socket) -> None:
    # shutdown(SHUT_WR) sends FIN even if some other process still holds a
    # duplicate of the fd (say, a grandchild the handler spawned), so the peer
    # sees EOF now rather than when the last copy goes away.
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # already reset or shut down by the peer or the handler
    conn.close()


def serve(
    fd: int,
    family: int,
    peer: Any,
    run: Callable[[socket.socket, Any], None],
    on_error: Callable[[socket.socket, Any], None],
    limits: ChildLimits | None = None,
    service: Service | None = None,
) -> int:
    """Run the handler on connection *fd*, close it; returns the exit status.

    *family* is the client's: with the PROXY protocol it need not be the
    socket's (an IPv4 client through a proxy on a Unix socket)."""
    # A Connection (deadlines.py) only where a deadline is configured.
    kind = socket.socket if limits is None else limits.connection_class
    conn = kind(family, socket.SOCK_STREAM, 0, fd) if service is None else kind(fileno=fd)
    started = time.monotonic() if limits is not None and limits.access_log else 0.0
    status = 1
    try:
        if limits is not None:
            limits.apply_to_connection(conn)
        if service is not None and service.tls is not None:
            conn, shaken = service.handshake(conn, family, peer)
            if not shaken:  # logged: the client did not complete a TLS handshake
                status = 0
                return status
        run(conn, peer)
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except (ConnectionResetError, BrokenPipeError) as exc:
        # The client went away mid-conversation: routine for a server, not a
        # handler bug, so one line, not a traceback.
        from .. import log

        log.get_logger(__name__).info(
            "%s: the client closed the connection (%s)", format_address(family, peer), exc.strerror
        )
        status = 0
    except BaseException as exc:
        from .limits import timeout_reason

        why = timeout_reason(conn, exc, limits)  # idle_timeout and the handler's own
        if why is None:
            on_error(conn, peer)
        else:
            from .. import log

            log.get_logger(__name__).info(
                "closing the connection from %s: %s", format_address(family, peer), why
            )
            status = 0
    finally:
        counts = byte_counts(conn) if started else None
        if service is not None and service.tls is not None:
            service.close_tls(conn)
        close_connection(conn)
        if started:
            access_line(family, peer, time.monotonic() - started, counts, status)
    return status


def access_line(
    family: int, peer: Any, duration: float, counts: tuple[int, int | None] | None, status: int
) -> None:
    """The child's access-log line: peer, pid, duration, bytes, exit status."""
    from .. import log

    peer_text = format_address(family, peer)
    got, sent = counts if counts is not None else ("-", "-")
    sent = "-" if sent is None else sent
    log.get_logger("forkserver.access").record(
        "%s pid %d %.3fs in %s out %s exit status %d",
        peer_text, os.getpid(), duration, got, sent, status,
        peer=peer_text, pid=os.getpid(), duration=round(duration, 6),
        bytes_in=counts[0] if counts else None, bytes_out=counts[1] if counts else None,
        status=f"exit status {status}",
    )  # fmt: skip
