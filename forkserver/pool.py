"""Pre-forked one-shot children (``spare_children``): the spare's side.

With ``spare_children = N`` the parent keeps N children forked before any
connection exists, so no connection waits for a fork.  Each spare is still
used once: it accepts exactly one connection, serves it and exits, and the
parent forks a fresh replacement.  A spare:

1. waits in its own epoll on the listeners, registered ``EPOLLEXCLUSIVE``
   (the kernel wakes one waiter per connection, not every spare), and on the
   read end of the parent's *retire pipe*;
2. accepts one connection and writes a fixed-size record (its pid and the
   peer's address) to the parent's *busy pipe*, so the parent can fork a
   replacement and knows whom the child serves;
3. closes the listeners and both pipes, and runs the handler like any child.

The parent retires idle spares by closing the retire pipe's write end: every
spare sees EOF and exits.  The kernel closes it too if the parent dies, so no
orphaned spare keeps a listener (and the port) open.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time

from . import log
from .child import detach_from_parent, leave, serve

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, NoReturn

    from .listeners import Listener

__all__ = ["BUSY_RECORD", "decode_busy", "run_spare", "wait_and_accept"]

logger = log.get_logger(__name__)

# pid, address family, port, address (IPv4 in the first 4 bytes, or IPv6).
# 24 bytes: well under PIPE_BUF, so each record is written atomically.
BUSY_RECORD = struct.Struct("=iHH16s")
_RETRY_ERRNOS = frozenset({errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO, errno.EINTR})


def encode_busy(pid: int, family: int, peer: Any) -> bytes:
    if family == socket.AF_INET:
        return BUSY_RECORD.pack(pid, family, peer[1], socket.inet_aton(peer[0]))
    if family == socket.AF_INET6:
        return BUSY_RECORD.pack(pid, family, peer[1], socket.inet_pton(family, peer[0]))
    return BUSY_RECORD.pack(pid, family, 0, b"")


def decode_busy(data: bytes) -> list[tuple[int, int, Any]]:
    """(pid, family, peer) for each whole record in *data*."""
    out = []
    for pid, family, port, raw in BUSY_RECORD.iter_unpack(data):
        if family == socket.AF_INET:
            peer: Any = (socket.inet_ntoa(raw[:4]), port)
        elif family == socket.AF_INET6:
            peer = (socket.inet_ntop(family, raw), port, 0, 0)
        else:
            peer = ""
        out.append((pid, family, peer))
    return out


def wait_and_accept(
    listeners: list[Listener], retire_fd: int, busy_fd: int
) -> tuple[int, int, Any] | None:
    """In a spare: wait for one connection and report it; None when retired.

    Returns (fd, family, peer) with the listeners, the retire pipe and the
    busy pipe already closed, so the caller holds only its connection.
    """
    poller = select.epoll(len(listeners) + 1)
    by_fd = {}
    for listener in listeners:
        poller.register(listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        by_fd[listener.fileno()] = listener
    poller.register(retire_fd, select.EPOLLIN)
    got = None
    try:
        while got is None:
            events = poller.poll()
            if any(fd == retire_fd for fd, _ in events):
                return None  # the parent is stopping, reloading or gone
            for fd, _ in events:
                listener = by_fd[fd]
                try:
                    conn_fd, peer = listener.sock._accept()  # type: ignore[attr-defined]
                except OSError as exc:
                    if exc.errno in _RETRY_ERRNOS:
                        continue  # another spare won the race, or the client left
                    # Out of descriptors or memory: wait, do not spin.
                    logger.error("spare %d: accept() failed: %s", os.getpid(), exc.strerror)
                    time.sleep(0.1)
                    continue
                got = (conn_fd, listener.family, peer)
                break
    finally:
        poller.close()
        for listener in listeners:
            listener.close()
        os.close(retire_fd)
    try:
        os.write(busy_fd, encode_busy(os.getpid(), got[1], got[2]))
    except OSError:
        pass  # the parent is gone; serve the connection all the same
    os.close(busy_fd)
    return got


def run_spare(
    listeners: list[Listener],
    retire_fd: int,
    busy_fd: int,
    parent_fds: Iterable[int],
    signals: tuple[int, ...],
    run: Callable[[socket.socket, Any], None],
    on_error: Callable[[socket.socket, Any], None],
) -> NoReturn:
    """Become a spare: wait, accept one connection, serve it; never returns.

    An idle spare that is retired exits 0."""
    status = 1
    try:
        detach_from_parent(parent_fds, signals)
        got = wait_and_accept(listeners, retire_fd, busy_fd)
        status = 0 if got is None else serve(got[0], got[1], got[2], run, on_error)
    finally:
        leave(status)
