"""PROXY protocol headers, read by the parent without ever blocking on one.

On a listener with ``proxy_protocol``, the client a connection is *for* is
the one named in the header the proxy sends first, and admission (allow,
deny, per-source limits) must judge that client, not the proxy.  Admission
lives in the parent, before any fork, so the parent reads the header:

* only from trusted sources (``proxy_trusted``; Unix clients always);
* by peeking, then consuming exactly the header's length, so the bytes after
  it stay in the socket for the handler;
* without waiting: a header not complete at accept() is watched on an
  edge-triggered epoll (a peek leaves the bytes in place, so a level-triggered
  watch would report them again at once, forever) until it is complete or
  ``proxy_timeout`` passes.

A malformed, truncated or late header, or an untrusted source, closes the
connection with a log line; its handler never runs.
"""

from __future__ import annotations

import select
import time
from socket import AF_INET6, MSG_DONTWAIT, MSG_PEEK, SOCK_STREAM
from socket import socket as Socket

from . import log
from .addresses import format_address
from .proxy_protocol import MAX_LENGTH, ProxyHeaderError, parse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    from .listeners import Listener
    from .parent.loop import Loop, Timer

__all__ = ["HeaderReader"]

logger = log.get_logger(__name__)

_EDGE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_CLOSED = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class _Waiting:
    """A connection whose header has not fully arrived yet."""

    __slots__ = ("deadline", "family", "listener", "peer", "sock", "timer")

    def __init__(self, sock: Socket, family: int, peer: Any, listener: Listener) -> None:
        self.sock = sock
        self.family = family
        self.peer = peer
        self.listener = listener
        self.deadline = time.monotonic() + listener.service.proxy_timeout
        self.timer: Timer | None = None


class HeaderReader:
    """Connections waiting for their PROXY header; *admit* gets each one
    whose header is complete: ``admit(fd, family, peer, listener)`` with the
    client the header names (or the real peer, for LOCAL and UNKNOWN)."""

    def __init__(
        self,
        admit: Callable[[int, int, Any, Listener], None],
        refused: Callable[[int, Any, str], None],
        loop: Loop,
    ) -> None:
        self._admit = admit
        self._loop = loop  # each header's deadline is a timer on the loop
        # Counts a refusal (metrics, access log): refused(family, peer, reason)
        # with "proxy_header" for a bad, late or missing header and
        # "proxy_untrusted" for the source.
        self._refused = refused
        self._epoll = select.epoll()
        self._waiting: dict[int, _Waiting] = {}
        # Called after headers were read or given up on: room for the next.
        self.on_done: Callable[[], None] | None = None
        # Called when the set of fds held here changed (a child forked next closes them).
        self.on_fds_changed: Callable[[], None] | None = None
        self._untrusted_log = log.Throttle(log.INTERVAL)

    def fileno(self) -> int:
        """Readable when some waiting connection got bytes (for the server's selector)."""
        return self._epoll.fileno()

    def __len__(self) -> int:
        return len(self._waiting)

    def fds(self) -> Iterator[int]:
        """Every fd held here: a new child closes them (other clients' connections)."""
        yield self._epoll.fileno()
        yield from self._waiting

    def start(self, fd: int, peer: Any, listener: Listener) -> None:
        """Read the header of accepted connection *fd*, now or when it arrives."""
        sock = Socket(listener.family, SOCK_STREAM, 0, fd)
        waiting = _Waiting(sock, listener.family, peer, listener)
        if not listener.service.trusts(listener.family, peer):
            # Anyone can reach the port: log this one at most once per interval.
            self._refused(listener.family, peer, "proxy_untrusted")
            if self._untrusted_log.ready():
                held = self._untrusted_log.take_suppressed()
                more = f" ({held} more since the last report)" if held else ""
                self._fail(waiting, f"not from a trusted source (proxy_trusted){more}", None)
            else:
                sock.close()
            return
        if self._read(waiting):
            return
        self._waiting[fd] = waiting
        if self.on_fds_changed is not None:
            self.on_fds_changed()
        # An fd already readable when added is reported at once, so bytes
        # that arrived since the read above are not missed.
        self._epoll.register(fd, _EDGE)
        waiting.timer = self._loop.call_at(waiting.deadline, lambda: self._expire(waiting))

    def ready(self, _: int = -1) -> None:
        """Some waiting connections got bytes (or closed): read their headers."""
        for fd, events in self._epoll.poll(0):
            waiting = self._waiting.get(fd)
            if waiting is not None:
                self._read(waiting, closed=bool(events & _CLOSED))
        if self.on_done is not None:
            self.on_done()

    def _expire(self, waiting: _Waiting) -> None:
        """*waiting*'s header is overdue: close it."""
        waiting.timer = None
        if self._waiting.get(waiting.sock.fileno()) is waiting:
            timeout = waiting.listener.service.proxy_timeout
            self._fail(waiting, f"no complete header within proxy_timeout ({timeout:g}s)")
        if self.on_done is not None:
            self.on_done()

    def close_all(self, why: str) -> None:
        for waiting in list(self._waiting.values()):
            self._fail(waiting, why)

    def close(self) -> None:
        self.close_all("the server is exiting")
        self._epoll.close()

    def _forget(self, waiting: _Waiting) -> None:
        """Stop watching *waiting*: before its fd is closed or handed on (a
        child forked next closes every fd still watched here)."""
        fd = waiting.sock.fileno()
        if self._waiting.get(fd) is waiting:
            del self._waiting[fd]
            self._epoll.unregister(fd)
            if self.on_fds_changed is not None:
                self.on_fds_changed()
        self._loop.cancel(waiting.timer)
        waiting.timer = None

    def _read(self, waiting: _Waiting, closed: bool = False) -> bool:
        """Try to take the header; True when the connection is dealt with.

        *closed*: the client has sent its FIN (a peek cannot tell that apart
        from bytes still to come)."""
        sock = waiting.sock
        try:
            data = sock.recv(MAX_LENGTH, MSG_PEEK | MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._fail(waiting, f"the connection failed: {exc.strerror}")
            return True
        try:
            header = parse(data) if data else None
        except ProxyHeaderError as exc:
            self._fail(waiting, str(exc))
            return True
        if header is None:
            if data and not closed:
                return False  # a prefix of a header: wait for the rest
            self._fail(waiting, f"the connection closed after {len(data)} bytes of a header")
            return True
        try:
            sock.recv(header.length)  # exactly the header: the peek showed it is all there
        except OSError as exc:
            self._fail(waiting, f"the connection failed: {exc.strerror}")
            return True
        if header.local or header.source is None or header.family is None:
            family, peer = waiting.family, waiting.peer  # a health check: the proxy itself
        else:
            family, peer = header.family, header.source
            if family == AF_INET6:  # the shape accept() gives: (host, port, flowinfo, scope_id)
                peer = (*peer, 0, 0)
        self._forget(waiting)
        self._admit(sock.detach(), family, peer, waiting.listener)
        return True

    def _fail(self, waiting: _Waiting, reason: str, kind: str | None = "proxy_header") -> None:
        self._forget(waiting)
        logger.warning(
            "PROXY header from %s: %s; closing the connection",
            format_address(waiting.family, waiting.peer),
            reason,
        )
        waiting.sock.close()  # first: refused() may fork, and the child must not hold it
        if kind is not None:
            self._refused(waiting.family, waiting.peer, kind)
