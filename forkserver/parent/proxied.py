"""PROXY protocol listeners: the parent reads each header before admission.

Admission must judge the client a proxy speaks for, not the proxy, so a
connection from a ``proxy_protocol`` listener waits in the header reader
(headers.py) until its header is in, then takes the ordinary path.  At most
``max(max_children, backlog)`` wait at once: each holds a descriptor in the
parent, and a slow proxy must not hold up the rest.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
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
        refusals: Refusals

        def take(self, fd: int, family: int, peer: Any, service: Service | None = None) -> None: ...
        def can_accept(self) -> bool: ...
        def pause(self) -> None: ...
        def resume(self) -> None: ...


__all__ = ["Proxied"]


class Proxied:
    """Connections of PROXY protocol listeners, until their header is read."""

    def __init__(self, gate: Gate, settings: Settings, loop: Loop, forker: Forker) -> None:
        self._gate = gate
        self._loop = loop
        self._forker = forker
        self.limit = max(settings.max_children, settings.backlog)
        self.reader: HeaderReader | None = None

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

    def finish(self) -> None:
        """After the loop: every connection still waiting is closed."""
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
        return self.reader is not None and len(self.reader) >= self.limit

    def wait_for_header(self, listener: Listener, fd: int, peer: Any) -> None:
        """Accepted connection *fd*: read its header, now or when it arrives."""
        assert self.reader is not None
        if len(self.reader) >= self.limit:  # when_full = "refuse"
            self._gate.refusals.refuse(fd, listener.family, peer, "proxy_backlog")
            return
        self.reader.start(fd, peer, listener)

    def _header_done(self) -> None:
        if not self._gate.listening:  # a header done: room for the next
            self._gate.resume()

    def _header_read(self, fd: int, family: int, peer: Any, listener: Listener) -> None:
        """The header of *fd* is in: admit the client it names."""
        gate = self._gate
        gate.take(fd, family, peer, listener.service)
        if gate.listening and not gate.can_accept():
            gate.pause()
