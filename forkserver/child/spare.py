"""A spare (``spare_children``): forked before any connection, it waits for one, serves it, exits.

A spare gets its connection one of two ways:

* **It accepts it itself** (a *direct* listener: TCP or Unix, no PROXY
  protocol, and no admission rule configured, since those need the parent to
  look at a connection before anything serves it).  Idle spares wait in
  epoll on the listener with ``EPOLLEXCLUSIVE``, so the kernel wakes one spare
  per connection, not all of them, and the connection reaches the process
  that serves it in one wakeup, with the parent off its path.  The parent
  watches these listeners only while no spare is idle.
* **The parent hands it over** (every other listener) on the handoff socket
  (``handoff.py``).

Either way the spare then writes its busy record, closes the listeners, the
handoff socket and the busy pipe, and runs the handler like any child.  A
spare retired before it got a connection (EOF on the handoff socket) exits 0.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from .. import title
from ..handoff import PEER, encode_peer, message_size, receive, report_busy
from ..listeners import BACKOFF_SECONDS, SKIPPED_ACCEPT_ERRNOS
from .datagram import answer
from .stream import serve
from .warm import warm_up

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

    from ..listeners import Listener
    from ..service import Service
    from .limits import ChildLimits

__all__ = ["receive_connection", "take_connection", "wait_and_serve"]

_MESSAGE = PEER.size + 108  # a Unix peer's path (sun_path: 108 bytes)


def receive_connection(
    handoff: socket.socket, busy_fd: int, size: int = _MESSAGE, flags: int = 0
) -> tuple[int, int, Any, int, bytes] | None:
    """In a spare: take the connection the parent handed over; None when
    retired.  Raises BlockingIOError with MSG_DONTWAIT in *flags* when there
    was none (another spare took it).

    Returns (fd, family, peer, service, datagram): the connection's fd, or a
    UDP socket's with the *datagram* to answer (b"" for a connection); the
    busy pipe is closed, the *handoff* socket is the caller's.  *size*: the
    longest message.
    """
    message = receive(handoff, size, flags)
    if message is None:
        os.close(busy_fd)
        return None  # EOF: the parent retired the spares (or is gone)
    data, got = message
    report_busy(busy_fd, False, data[: PEER.size])
    return got


def take_connection(
    handoff_fd: int,
    busy_fd: int,
    direct: Mapping[Listener, int],
    size: int = _MESSAGE,
) -> tuple[int, int, Any, int, bytes] | None:
    """In a spare: accept a connection from a *direct* listener, or receive
    one handed over; None when retired.  As :func:`receive_connection`;
    *direct* maps each listener to its service's index + 1 (or 0).  The
    handoff socket and the listeners are closed here.
    """
    handoff = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, handoff_fd)
    try:
        if not direct:
            return receive_connection(handoff, busy_fd, size)
        return _accept_or_receive(handoff, busy_fd, direct, size)
    finally:
        handoff.close()
        for listener in direct:
            os.close(listener.fileno())  # the child closes the listeners: only its reference


def _accept_or_receive(
    handoff: socket.socket, busy_fd: int, direct: Mapping[Listener, int], size: int
) -> tuple[int, int, Any, int, bytes] | None:
    by_fd = {listener.fileno(): listener for listener in direct}
    handoff_fd = handoff.fileno()
    with select.epoll(len(direct) + 1) as waiting:  # close-on-exec
        # Not EPOLLEXCLUSIVE: EOF on the handoff socket (retired) must wake
        # every idle spare.
        waiting.register(handoff_fd, select.EPOLLIN)
        for fd in by_fd:
            waiting.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        while True:
            events = waiting.poll()
            if len(events) > 1:
                # A connection handed over first: it was accepted before what
                # is still in the listener's queue, and only a spare takes it.
                events.sort(key=lambda event: event[0] != handoff_fd)
            for fd, _ in events:
                if fd == handoff_fd:  # a connection handed over, or EOF: retired
                    try:
                        return receive_connection(handoff, busy_fd, size, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue  # another spare took the message first
                listener = by_fd[fd]
                try:
                    conn, peer = listener.sock._accept()  # type: ignore[attr-defined]
                except (BlockingIOError, InterruptedError):
                    continue  # another spare (or the parent) took it
                except OSError as exc:
                    if exc.errno == errno.EINVAL:  # shut down: the parent is stopping
                        waiting.unregister(fd)
                    elif exc.errno not in SKIPPED_ACCEPT_ERRNOS:
                        time.sleep(BACKOFF_SECONDS)  # EMFILE and the like: as the parent
                    continue
                family, index = listener.family, direct[listener]
                report_busy(busy_fd, True, encode_peer(family, peer, index)[: PEER.size])
                return conn, family, peer, index, b""


def wait_and_serve(
    handoff_fd: int,
    busy_fd: int,
    run: Callable[[socket.socket, Any], None],
    on_error: Callable[[socket.socket, Any], None],
    limits: ChildLimits | None,
    services: Sequence[Service],
    direct: Mapping[Listener, int],
) -> int:
    """A spare's work (run by ``start.become``): wait for one connection,
    serve it; returns the exit status, 0 if retired before any came.

    A connection from a listener with a service (its own handler, TLS, the
    PROXY protocol) names it by index into *services*, plus one.  *direct*:
    the listeners the spare accepts from itself, with that index."""
    # Copy the pages the connection path writes now, before a client waits;
    # best effort: a sandbox may forbid the socketpair it needs.  One round:
    # the parent's warm-up has quickened the path already.
    try:
        warm_up([listener.family for listener in direct], (), rounds=1)
    except OSError:
        pass
    got = take_connection(handoff_fd, busy_fd, direct, message_size(services))
    if got is None:
        return 0
    fd, family, peer, index, datagram = got
    if title.set_title is not None:  # no longer a spare: say whom it serves
        title.set_title(title.child(family, peer))
    service = services[index - 1] if index else None
    if service is None:
        return serve(fd, family, peer, run, on_error, limits)
    if service.datagram:
        return answer(fd, datagram, family, peer, service.run, on_error, limits)
    return serve(fd, family, peer, service.run, on_error, limits, service)
