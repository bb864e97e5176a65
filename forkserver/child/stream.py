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

__all__ = ["access_line", "close_connection", "serve", "served"]


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
            served(family, peer, time.monotonic() - started, counts or (None, None), status)
    return status


def served(
    family: int, peer: Any, duration: float, counts: tuple[int | None, int | None], status: int
) -> None:
    """The child's own access-log line, written as it ends: the byte counts
    (TCP_INFO) are known only here.  CPU and peak RSS are its own so far,
    and its waited-for children's: what the parent's wait4 will say, but
    for the few system calls left before the exit."""
    import resource  # imported by the parent already (ChildTable.keep_usage): free here

    mine = resource.getrusage(resource.RUSAGE_SELF)
    theirs = resource.getrusage(resource.RUSAGE_CHILDREN)
    usage = (
        mine.ru_utime + theirs.ru_utime,
        mine.ru_stime + theirs.ru_stime,
        max(mine.ru_maxrss, theirs.ru_maxrss),
    )
    access_line(
        format_address(family, peer), os.getpid(), duration, counts, f"exit status {status}", usage
    )


def access_line(
    peer_text: str,
    pid: int,
    duration: float,
    counts: tuple[int | None, int | None] | None,
    how: str,
    usage: tuple[float, float, int] | None,
    reason: str = "",
) -> None:
    """One access-log line: peer, pid, duration, bytes in and out (*counts*,
    None: not known to the writer, left out of the text), how it ended and
    why, and *usage*: CPU user and system seconds and peak RSS in KiB."""
    from .. import log

    text = f"{peer_text} pid {pid} {duration:.3f}s"
    fields: dict[str, Any] = {"peer": peer_text, "pid": pid, "duration": round(duration, 6)}
    if counts is not None:
        got, sent = ("-" if n is None else n for n in counts)
        text += f" in {got} out {sent}"
        fields["bytes_in"], fields["bytes_out"] = counts
    text += f" {how}"
    fields["status"] = how
    if reason:
        text += f": {reason}"
        fields["reason"] = reason
    if usage is not None:
        user, system, max_rss = usage
        text += f"; cpu {user:.3f}s user {system:.3f}s sys, max rss {max_rss} KiB"
        fields["cpu_user"], fields["cpu_system"] = round(user, 6), round(system, 6)
        fields["max_rss"] = max_rss << 10  # bytes
    log.get_logger("forkserver.access").record("%s", text, **fields)
