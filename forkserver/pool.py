"""Pre-forked one-shot children (``spare_children``): the spare's side.

With ``spare_children = N`` the parent keeps N children forked before any
connection exists, so no connection waits for a fork.  Each spare is still
used once: it serves exactly one connection and exits, and the parent forks a
fresh replacement.  A spare gets its connection one of two ways:

* **It accepts it itself** (a *direct* listener: TCP or Unix, no PROXY
  protocol, and no admission rule configured, since those need the parent to
  look at a connection before anything serves it).  Idle spares wait in
  epoll on the listener with ``EPOLLEXCLUSIVE``, so the kernel wakes one spare
  per connection, not all of them, and the connection reaches the process
  that serves it in one wakeup, with the parent off its path.  The parent
  watches these listeners only while no spare is idle.
* **The parent hands it over** (every other listener): the parent accepts,
  admits, and sends the connection's fd (``SCM_RIGHTS``) with the peer's
  address over a ``SOCK_SEQPACKET`` socketpair, the *handoff socket*; the
  kernel gives each message to exactly one spare.

Either way the spare then writes a fixed-size record (its pid, whether it
accepted the connection itself, the peer) to the parent's *busy pipe*, so
the parent knows which child serves whom, closes the listeners, the handoff
socket and the pipe, and runs the handler like any child.

The parent retires idle spares by closing its end of the handoff socket:
spares first take any connection still queued in it, then read EOF and exit.
The kernel closes it too if the parent dies.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
import time

from .child import ChildLimits, answer, detach_from_parent, leave, serve, setup_failed
from .listeners import BACKOFF_SECONDS, SKIPPED_ACCEPT_ERRNOS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from typing import Any, NoReturn

    from .listeners import Listener
    from .service import Service

__all__ = ["BUSY_RECORD", "decode_busy", "encode_peer", "message_size", "reclaim", "run_spare"]

# Address family, port, the listener's service (0: none, else its index + 1),
# address (IPv4 in the first 4 bytes, or IPv6).
PEER = struct.Struct("=HHH16s")
# The spare's pid, 1 if it accepted the connection itself (else 0), then the
# peer: well under PIPE_BUF, so written atomically.
BUSY_RECORD = struct.Struct("=iB" + PEER.format[1:])
_FD_SPACE = socket.CMSG_SPACE(4)
_MESSAGE = PEER.size + 108  # and a Unix peer's path (sun_path: 108 bytes)
_DATAGRAM = 65535  # or a datagram, for a UDP listener's service


def encode_peer(family: int, peer: Any, service: int = 0) -> bytes:
    """The handoff message: PEER, then a Unix peer's path, if it has one
    (the busy record copies only PEER: the parent lists it as unnamed)."""
    if family == socket.AF_INET:
        return PEER.pack(family, peer[1], service, socket.inet_aton(peer[0]))
    if family == socket.AF_INET6:
        return PEER.pack(family, peer[1], service, socket.inet_pton(family, peer[0]))
    path = os.fsencode(peer) if isinstance(peer, str) else bytes(peer or b"")
    return PEER.pack(family, 0, service, b"") + path


def _decode_peer(family: int, port: int, raw: bytes, path: bytes = b"") -> Any:
    if family == socket.AF_INET:
        return (socket.inet_ntoa(raw[:4]), port)
    if family == socket.AF_INET6:
        return (socket.inet_ntop(family, raw), port, 0, 0)
    return os.fsdecode(path)


def decode_busy(data: bytes) -> list[tuple[int, bool, int, Any]]:
    """(pid, accepted itself, family, peer) for each whole record in *data*."""
    return [
        (pid, bool(direct), family, _decode_peer(family, port, raw))
        for pid, direct, family, port, _, raw in BUSY_RECORD.iter_unpack(data)
    ]


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
    message = _receive(handoff, size, flags)
    if message is None:
        os.close(busy_fd)
        return None  # EOF: the parent retired the spares (or is gone)
    data, got = message
    _report_busy(busy_fd, False, data[: PEER.size])
    return got


def _receive(
    handoff: socket.socket, size: int, flags: int
) -> tuple[bytes, tuple[int, int, Any, int, bytes]] | None:
    """One handoff message, as (its bytes, (fd, family, peer, service,
    datagram or b"")); None at EOF."""
    # MSG_CMSG_CLOEXEC: as accept4() does for a child forked on accept, so a
    # handler's own subprocesses do not inherit the client's socket.
    data, ancillary, _, _ = handoff.recvmsg(size, _FD_SPACE, flags | socket.MSG_CMSG_CLOEXEC)
    if not data:
        return None
    fd = next(
        int.from_bytes(cdata[:4], sys.byteorder)
        for level, kind, cdata in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
    )
    family, port, service, raw = PEER.unpack_from(data)
    tail = data[PEER.size :]  # a Unix peer's path, or a datagram
    if family == socket.AF_UNIX:
        return data, (fd, family, _decode_peer(family, port, raw, tail), service, b"")
    return data, (fd, family, _decode_peer(family, port, raw), service, tail)


def reclaim(handoff_child: int, size: int) -> list[tuple[int, int, Any, int, bytes]]:
    """In the parent, retiring the spares: take back what is still queued in
    the handoff socket (fd *handoff_child*, the spares' end), as (fd, family,
    peer, service, datagram) each.  A spare counted idle may have accepted a
    connection of its own meanwhile: what was handed to it would otherwise
    wait for a spare that never comes."""
    spares_end = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, handoff_child)
    taken: list[tuple[int, int, Any, int, bytes]] = []
    try:
        while message := _receive(spares_end, size, socket.MSG_DONTWAIT):
            taken.append(message[1])
    except (BlockingIOError, InterruptedError):
        pass  # all taken
    finally:
        spares_end.detach()  # still the parent's, closed with the others
    return taken


def _report_busy(busy_fd: int, direct: bool, peer: bytes) -> None:
    """Tell the parent whom this spare serves, and let go of the busy pipe."""
    try:
        os.write(busy_fd, struct.pack("=iB", os.getpid(), direct) + peer)
    except OSError:
        pass  # the parent is gone; serve the connection all the same
    os.close(busy_fd)


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
                _report_busy(busy_fd, True, encode_peer(family, peer, index)[: PEER.size])
                return conn, family, peer, index, b""


def message_size(services: Sequence[Service]) -> int:
    """The longest handoff message for *services*: with a UDP listener, a datagram."""
    return PEER.size + (_DATAGRAM if any(s.datagram for s in services) else 108)


def run_spare(
    handoff_fd: int,
    busy_fd: int,
    parent_fds: Iterable[int],
    signals: tuple[int, ...],
    run: Callable[[socket.socket, Any], None],
    on_error: Callable[[socket.socket, Any], None],
    limits: ChildLimits | None = None,
    services: Sequence[Service] = (),
    direct: Mapping[Listener, int] | None = None,
) -> NoReturn:
    """Become a spare: wait for one connection, serve it; never returns.

    A connection from a listener with a service (its own handler, TLS, the
    PROXY protocol) names it by index into *services*, plus one.  *direct*:
    the listeners the spare accepts from itself, with that index.  A spare
    retired before it got a connection exits 0."""
    status = 1
    try:
        detach_from_parent(parent_fds, signals)
        if limits is not None:
            limits.apply_to_process()  # as the user, before any connection arrives
        size = message_size(services)
        got = take_connection(handoff_fd, busy_fd, direct or {}, size)
        if got is None:
            status = 0
        else:
            fd, family, peer, index, datagram = got
            service = services[index - 1] if index else None
            if service is None:
                status = serve(fd, family, peer, run, on_error, limits)
            elif service.datagram:
                status = answer(fd, datagram, family, peer, service.run, on_error, limits)
            else:
                status = serve(fd, family, peer, service.run, on_error, limits, service)
    except Exception:
        setup_failed(0, None)
    finally:
        leave(status)
