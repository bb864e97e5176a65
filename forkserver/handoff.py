"""The wire between the parent and its spares (``spare_children``).

* The *handoff socket*, a ``SOCK_SEQPACKET`` socketpair: the parent sends an
  accepted connection's fd (``SCM_RIGHTS``) with the peer's address (and,
  for a UDP listener, the datagram to answer); the kernel gives each message
  to exactly one spare.  Closing the parent's end retires the idle spares:
  they read EOF.
* The *busy pipe*: a spare that got a connection, handed over or accepted
  itself, writes a fixed-size record (its pid, which, the peer), atomically
  (well under PIPE_BUF), so the parent knows which child serves whom.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from .service import Service

__all__ = [
    "BUSY_RECORD",
    "PEER",
    "decode_busy",
    "encode_peer",
    "message_size",
    "receive",
    "reclaim",
    "report_busy",
]

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


def receive(
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
        while message := receive(spares_end, size, socket.MSG_DONTWAIT):
            taken.append(message[1])
    except (BlockingIOError, InterruptedError):
        pass  # all taken
    finally:
        spares_end.detach()  # still the parent's, closed with the others
    return taken


def report_busy(busy_fd: int, direct: bool, peer: bytes) -> None:
    """Tell the parent whom this spare serves, and let go of the busy pipe."""
    try:
        os.write(busy_fd, struct.pack("=iB", os.getpid(), direct) + peer)
    except OSError:
        pass  # the parent is gone; serve the connection all the same
    os.close(busy_fd)


def message_size(services: Sequence[Service]) -> int:
    """The longest handoff message for *services*: with a UDP listener, a datagram."""
    return PEER.size + (_DATAGRAM if any(s.datagram for s in services) else 108)
