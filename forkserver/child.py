"""What runs inside a child, from the moment fork() returns 0 until os._exit().

The child serves exactly one connection.  It first lets go of everything
that belongs to the parent (listeners, the selector, the wakeup pipe, the
parent's signal handlers), then runs the handler, closes the connection so the
peer sees EOF, and leaves with ``os._exit(status)``: it must never return into
the parent's accept loop, nor run the parent's atexit handlers or finalizers.

Exit status: 0 when the handler returned, 1 when it raised (the traceback is
logged with the peer), N for ``sys.exit(N)``.
"""

from __future__ import annotations

import _signal  # the C module behind signal: see the note in serve_connection
import os
import socket
import sys

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, NoReturn

__all__ = ["detach_from_parent", "leave", "serve", "serve_connection"]


def _close_connection(conn: socket.socket) -> None:
    # shutdown(SHUT_WR) sends FIN even if some other process still holds a
    # duplicate of the fd (say, a grandchild the handler spawned), so the peer
    # sees EOF now rather than when the last copy goes away.
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # already reset or shut down by the peer or the handler
    conn.close()


def detach_from_parent(parent_fds: Iterable[int], signals: tuple[int, ...]) -> None:
    """Let go of the parent's state: its signal handlers and its descriptors.

    *signals* are the parent's handled signals, blocked across fork: they get
    SIG_DFL back before they are unblocked, so the parent's handlers never
    run here.
    """
    if signals:
        # _signal, not signal: signal.py's wrappers turn every argument and
        # result into an enum member, and that machinery touches (so copies)
        # ~100 shared pages in each child: half a fork's cost.
        _signal.set_wakeup_fd(-1)
        for signum in signals:
            _signal.signal(signum, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, signals)
    for parent_fd in parent_fds:
        try:
            os.close(parent_fd)
        except OSError:
            pass  # already closed


def serve(
    fd: int,
    family: int,
    peer: Any,
    run: Callable[[socket.socket, Any], None],
    on_error: Callable[[socket.socket, Any], None],
) -> int:
    """Run the handler on connection *fd*, close it; returns the exit status."""
    conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    try:
        run(conn, peer)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        on_error(conn, peer)
        return 1
    finally:
        _close_connection(conn)


def leave(status: int) -> NoReturn:
    """End the child: never return into the parent's loop, never run its atexit."""
    # Flush what the handler print()ed: os._exit skips interpreter cleanup.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass  # a closed or broken stream: nothing more can be said
    os._exit(status)


def serve_connection(
    fd: int,
    family: int,
    peer: Any,
    parent_fds: Iterable[int],
    signals: tuple[int, ...],
    run: Callable[[socket.socket, Any], None],
    on_error: Callable[[socket.socket, Any], None],
) -> NoReturn:
    """Become the child for connection *fd* (forked on accept); never returns."""
    status = 1
    try:
        detach_from_parent(parent_fds, signals)  # before any user code runs
        status = serve(fd, family, peer, run, on_error)
    finally:
        leave(status)
