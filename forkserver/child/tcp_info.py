"""TCP_INFO: what the kernel knows of a connection (idle time, byte counts)."""

from __future__ import annotations

import socket
import sys

__all__ = ["byte_counts", "silent_for", "tcp_info"]


def tcp_info(conn: socket.socket) -> bytes:
    """The connection's struct tcp_info; b"" for a Unix socket or on error."""
    if conn.family not in (socket.AF_INET, socket.AF_INET6):
        return b""
    try:
        return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return b""


def silent_for(conn: socket.socket) -> float | None:
    """Seconds since the client last sent data (TCP_INFO), or None if unknown."""
    info = tcp_info(conn)
    return int.from_bytes(info[52:56], sys.byteorder) / 1000 if len(info) >= 56 else None


# TCP states after the peer's FIN: TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING.
_FIN_RECEIVED = frozenset({6, 8, 9, 11})


def byte_counts(conn: socket.socket) -> tuple[int, int] | None:
    """(bytes received, bytes sent and acknowledged) from TCP_INFO, or None."""
    info = tcp_info(conn)
    if len(info) < 136:  # tcpi_bytes_acked (offset 120) and tcpi_bytes_received (128)
        return None
    received = int.from_bytes(info[128:136], sys.byteorder)
    # The peer's FIN takes a sequence number and is counted as a byte: take
    # it off once the state (tcpi_state, byte 0) says it has arrived.
    if info[0] in _FIN_RECEIVED:
        received -= 1
    return received, int.from_bytes(info[120:128], sys.byteorder)
