"""Refusing a connection or dropping a datagram: the busy message, the count, the log line.

A refusal is counted by reason (metrics), written to the access log, and
logged as a warning at most once per interval per reason, with how many were
held back: a flood of refusals must not become a flood of log lines.  A
failed accept() or fork() is logged the same way.
"""

from __future__ import annotations

import os
from socket import MSG_DONTWAIT, SHUT_WR, SOCK_STREAM
from socket import socket as Socket

from .. import log
from ..addresses import format_address

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Refusals"]

logger = log.get_logger(__name__)
access = log.get_logger("forkserver.access")


class Refusals:
    """Counts refusals by reason; refuses connections and drops datagrams."""

    def __init__(self, busy_message: str, access_log: bool) -> None:
        self._busy = busy_message.encode()
        self._access_log = access_log
        self.refused: dict[str, int] = {}
        self._logs: dict[str, log.Throttle] = {}
        self._accept_log = log.Throttle(log.INTERVAL)
        self._fork_log = log.Throttle(log.INTERVAL)

    def count(self, family: int, peer: Any, reason: str, past: str = "refused") -> None:
        """Count a refusal by reason (metrics), with its access-log line."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self._access_log:
            peer_text = format_address(family, peer)
            access.record("%s %s %s", peer_text, past, reason, peer=peer_text, status=reason)

    def note(
        self, family: int, peer: Any, reason: str, what: str = "refused", past: str = "refused"
    ) -> None:
        """count(), and a warning at most once per interval per reason."""
        self.count(family, peer, reason, past)
        throttle = self._logs.get(reason)
        if throttle is None:
            throttle = self._logs[reason] = log.Throttle(log.INTERVAL)
        if throttle.ready():
            held = throttle.take_suppressed()
            logger.warning(
                "%s %s: %s%s",
                what,
                format_address(family, peer),
                reason,
                f" ({held} more {past} for this reason since the last report)" if held else "",
            )

    def refuse(self, fd: int, family: int, peer: Any, reason: str) -> None:
        """Close accepted connection *fd* after the busy message; noted."""
        self.note(family, peer, reason)
        sock = Socket(family, SOCK_STREAM, 0, fd)
        try:
            if self._busy:
                sock.send(self._busy, MSG_DONTWAIT)
            sock.shutdown(SHUT_WR)
        except OSError:
            pass  # the client left already; it is refused all the same
        sock.close()

    def drop_datagram(self, family: int, peer: Any, reason: str) -> None:
        """Drop a datagram: counted and logged like a refused connection; no
        reply (a UDP client cannot tell a refusal from a loss anyway)."""
        self.note(family, peer, reason, "dropped a datagram from", "dropped")

    def accept_failed(self, listener_name: str, exc: OSError, pause: float) -> None:
        """accept() failed (out of descriptors, say): an error, at most once per interval."""
        if self._accept_log.ready():
            held = self._accept_log.take_suppressed()
            logger.error(
                "accept() on %s failed: %s; pausing accepts for %.1fs%s",
                listener_name,
                os.strerror(exc.errno or 0),
                pause,
                f" ({held} more failures since the last report)" if held else "",
            )

    def fork_failed(self, exc: OSError, consequence: str) -> None:
        """fork() failed: an error, at most once per interval."""
        if self._fork_log.ready():
            held = self._fork_log.take_suppressed()
            logger.error(
                "fork() failed: %s; %s%s",
                exc.strerror,
                consequence,
                f" ({held} more since the last report)" if held else "",
            )
