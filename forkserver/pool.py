"""Pre-forked one-shot children (``spare_children``): the spare's side.

With ``spare_children = N`` the parent keeps N children forked before any
connection exists, so no connection waits for a fork.  Each spare is still
used once: it serves exactly one connection and exits, and the parent forks a
fresh replacement.  The parent still does every accept() and decides, before
anything is forked, whether a connection is admitted; it then hands the
connection to a spare:

1. the parent sends the connection's fd (``SCM_RIGHTS``) with the peer's
   address over a ``SOCK_SEQPACKET`` socketpair, the *handoff socket*; every
   idle spare waits in recvmsg() on the other end, and the kernel gives each
   message to exactly one of them;
2. the spare writes a fixed-size record (its pid and the peer) to the
   parent's *busy pipe*, so the parent knows which child serves whom;
3. the spare closes both and runs the handler like any child.

The parent retires idle spares by closing its end of the handoff socket:
spares first take any connection still queued in it, then read EOF and exit.
The kernel closes it too if the parent dies.  Spares never hold a listener.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

from .child import ChildLimits, answer, detach_from_parent, leave, serve, setup_failed

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any, NoReturn

    from .service import Service

__all__ = ["BUSY_RECORD", "decode_busy", "encode_peer", "run_spare"]

# Address family, port, the listener's service (0: none, else its index + 1),
# address (IPv4 in the first 4 bytes, or IPv6).
PEER = struct.Struct("=HHH16s")
# The spare's pid, then the peer: well under PIPE_BUF, so written atomically.
BUSY_RECORD = struct.Struct("=i" + PEER.format[1:])
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


def decode_busy(data: bytes) -> list[tuple[int, int, Any]]:
    """(pid, family, peer) for each whole record in *data*."""
    return [
        (pid, family, _decode_peer(family, port, raw))
        for pid, family, port, _, raw in BUSY_RECORD.iter_unpack(data)
    ]


def receive_connection(
    handoff_fd: int, busy_fd: int, size: int = _MESSAGE
) -> tuple[int, int, Any, int, bytes] | None:
    """In a spare: wait for the parent to hand over a connection; None when retired.

    Returns (fd, family, peer, service, datagram): the connection's fd, or a
    UDP socket's with the *datagram* to answer (b"" for a connection); the
    handoff socket and busy pipe are closed.  *size*: the longest message.
    """
    handoff = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, handoff_fd)
    try:
        # MSG_CMSG_CLOEXEC: as accept4() does for a child forked on accept, so
        # a handler's own subprocesses do not inherit the client's socket.
        data, ancillary, _, _ = handoff.recvmsg(size, _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
    finally:
        handoff.close()
    if not data:
        os.close(busy_fd)
        return None  # EOF: the parent retired the spares (or is gone)
    fd = next(
        int.from_bytes(cdata[:4], sys.byteorder)
        for level, kind, cdata in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
    )
    family, port, service, raw = PEER.unpack_from(data)
    try:
        os.write(busy_fd, struct.pack("=i", os.getpid()) + data[: PEER.size])
    except OSError:
        pass  # the parent is gone; serve the connection all the same
    os.close(busy_fd)
    tail = data[PEER.size :]  # a Unix peer's path, or a datagram
    if family == socket.AF_UNIX:
        return fd, family, _decode_peer(family, port, raw, tail), service, b""
    return fd, family, _decode_peer(family, port, raw), service, tail


def run_spare(
    handoff_fd: int,
    busy_fd: int,
    parent_fds: Iterable[int],
    signals: tuple[int, ...],
    run: Callable[[socket.socket, Any], None],
    on_error: Callable[[socket.socket, Any], None],
    limits: ChildLimits | None = None,
    services: Sequence[Service] = (),
) -> NoReturn:
    """Become a spare: wait for one connection, serve it; never returns.

    A connection from a listener with a service (its own handler, TLS, the
    PROXY protocol) names it by index into *services*, plus one.  A spare
    retired before it got a connection exits 0."""
    status = 1
    try:
        detach_from_parent(parent_fds, signals)
        if limits is not None:
            limits.apply_to_process()  # as the user, before any connection arrives
        size = PEER.size + (_DATAGRAM if any(s.datagram for s in services) else 108)
        got = receive_connection(handoff_fd, busy_fd, size)
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
