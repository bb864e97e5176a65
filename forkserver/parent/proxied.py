"""PROXY protocol listeners: the parent reads each header before admission.

Admission must judge the client a proxy speaks for, not the proxy, so a
connection from a ``proxy_protocol`` listener waits in the header reader
(headers.py) until its header is in, then takes the ordinary path.

Each waiting connection holds a descriptor in the parent, so at most
``max(max_children, backlog)`` wait at once, and never more than the
descriptors left: RLIMIT_NOFILE less RESERVE less what the parent holds
otherwise.  At that limit only the PROXY listeners pause (or, with
``when_full = "refuse"``, refuse): the parent's own work and the plain
listeners keep the reserve, so a flood of connections that never send a
header cannot stall another listener's clients (it did: 3.0 s, while every
accept() failed with EMFILE).
"""

from __future__ import annotations

import os
import time

from .. import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sized
    from typing import Any, Protocol

    from ..config import Settings
    from ..headers import HeaderReader
    from ..listeners import Listener
    from ..service import Service
    from .fork import Forker
    from .loop import Loop
    from .refusals import Refusals

    class Gate(Protocol):
        """What the header reader's connections ask of the acceptor (accept.py)."""

        listening: bool
        listeners: list[Listener]
        refusals: Refusals

        def take(self, fd: int, family: int, peer: Any, service: Service | None = None) -> None: ...
        def can_accept(self) -> bool: ...
        def pause(self) -> None: ...
        def resume(self) -> None: ...
        def watch_direct(self, listener: Listener, watch: bool) -> None: ...


__all__ = ["RESERVE", "Proxied"]

logger = log.get_logger(__name__)

# Descriptors header waiters leave to the rest of the parent: a plain
# listener's connection needs two for a moment (its socket, its child's
# pidfd), a reload, a scrape or a log reopen a few more.
RESERVE = 32
RECOUNT_SECONDS = 1.0  # how stale the count of the parent's other descriptors may be


class Proxied:
    """Connections of PROXY protocol listeners, until their header is read."""

    def __init__(
        self, gate: Gate, settings: Settings, loop: Loop, forker: Forker, children: Sized
    ) -> None:
        self._gate = gate
        self._loop = loop
        self._forker = forker
        self._children = children  # each child holds a pidfd in the parent
        self._refuse = settings.when_full == "refuse"
        self.limit = max(settings.max_children, settings.backlog)
        self.reader: HeaderReader | None = None
        self.paused: set[Listener] = set()  # PROXY listeners left unwatched: at the limit
        self._others = 0  # descriptors held besides waiters and pidfds, when last counted
        self._counted = 0.0
        self._pause_log = log.Throttle(log.INTERVAL)

    def start(self) -> None:
        """Before the first fork: the header reader, on the loop."""
        if self.reader is not None:
            return
        from ..headers import HeaderReader

        self.reader = reader = HeaderReader(
            self._header_read, self._gate.refusals.count, self._loop
        )
        reader.on_done = self._header_done
        reader.on_fds_changed = self._forker.changed
        self._forker.changed()
        self._loop.add_reader(reader.fileno(), reader.ready)
        self.count_descriptors()

    def finish(self) -> None:
        """After the loop: every connection still waiting is closed."""
        self.paused.clear()
        if self.reader is not None:
            self._loop.remove_reader(self.reader.fileno())
            self.reader.close()
            self.reader = None
            self._forker.changed()

    def fds(self) -> Iterator[int]:
        if self.reader is not None:
            yield from self.reader.fds()

    def full(self) -> bool:
        """Whether as many connections wait for a header as the parent affords."""
        return self.reader is not None and len(self.reader) >= self.afford()

    def afford(self) -> int:
        """How many connections may wait for a header, with the descriptors left now."""
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return self.limit
        waiting = len(self.reader) if self.reader is not None else 0
        # Near the limit by the last count: count again (a listdir of
        # /proc/self/fd, only here and at most once a second).
        near = waiting + self._others + len(self._children) + RESERVE >= soft
        if near and time.monotonic() - self._counted >= RECOUNT_SECONDS:
            self.count_descriptors()
        return max(0, min(self.limit, soft - RESERVE - self._others - len(self._children)))

    def count_descriptors(self) -> None:
        """Count what the parent holds besides header waiters and pidfds."""
        held = len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
        waiting = len(self.reader) if self.reader is not None else 0
        self._others = max(0, held - waiting - len(self._children))
        self._counted = time.monotonic()

    def wait_for_header(self, listener: Listener, fd: int, peer: Any) -> None:
        """Accepted connection *fd*: read its header, now or when it arrives."""
        assert self.reader is not None
        if self.full():  # when_full = "refuse", or the descriptors ran short since
            self._gate.refusals.refuse(fd, listener.family, peer, "proxy_backlog")
            return
        self.reader.start(fd, peer, listener)
        if not self._refuse and self.full():
            self._pause()

    def _pause(self) -> None:
        """At the limit: stop watching the PROXY listeners alone; their
        clients wait in the backlog, the plain listeners go on."""
        for listener in self._gate.listeners:
            if _proxy(listener) and listener not in self.paused:
                self.paused.add(listener)
                if self._gate.listening:
                    self._gate.watch_direct(listener, False)
        if self._pause_log.ready():
            held = self._pause_log.take_suppressed()
            logger.warning(
                "%d connections wait for a PROXY header, as many as the descriptors "
                "allow: the PROXY listeners pause%s",
                len(self.reader or ()),
                f" ({held} more times since the last report)" if held else "",
            )

    def _header_done(self) -> None:
        if self.paused and not self.full():
            paused, self.paused = self.paused, set()
            if self._gate.listening:
                for listener in paused:
                    if not listener.closed:
                        self._gate.watch_direct(listener, True)
        if not self._gate.listening:  # a header done: room for the next
            self._gate.resume()

    def _header_read(self, fd: int, family: int, peer: Any, listener: Listener) -> None:
        """The header of *fd* is in: admit the client it names."""
        gate = self._gate
        gate.take(fd, family, peer, listener.service)
        if gate.listening and not gate.can_accept():
            gate.pause()


def _proxy(listener: Listener) -> bool:
    return listener.service is not None and listener.service.trusted is not None
