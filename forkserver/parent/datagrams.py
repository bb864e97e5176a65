"""UDP: read a datagram, admit it, give it a child (socketserver's ForkingUDPServer).

A datagram is not a connection: the parent reads it with recvfrom(), and the
child gets its own copy of the UDP socket with the datagram to answer (with
sendto()).  At max_children a datagram waits for a slot only where a
connection would (a stop's drain, ``when_full = "wait"``), at most
``backlog`` of them; otherwise it is dropped and counted.
"""

from __future__ import annotations

import os
import time
from collections import deque

from .. import log
from ..addresses import format_address
from ..child.datagram import answer
from ..child.start import become

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, Protocol

    from ..admission import Admission
    from ..child.limits import ChildLimits
    from ..config import Settings
    from ..listeners import Listener
    from ..service import Service
    from .children import Child, ChildTable
    from .fork import Forker
    from .refusals import Refusals
    from .spares import Spares

    class Gate(Protocol):
        """What the datagrams ask of the acceptor (accept.py)."""

        accepted: int
        stopping: bool
        refusals: Refusals
        spares: Spares | None
        per_child_work: bool

        def can_accept(self) -> bool: ...
        def pause(self) -> None: ...
        def busy_children(self) -> int: ...
        def serving_starts(self, child: Child) -> None: ...
        def fork_failed_backing_off(self, exc: OSError, consequence: str) -> None: ...


__all__ = ["DATAGRAM_MAX", "Datagrams"]

logger = log.get_logger(__name__)

DATAGRAM_MAX = 65535  # the largest UDP payload


class Datagrams:
    """The UDP listeners' side of the acceptor."""

    def __init__(
        self,
        gate: Gate,
        settings: Settings,
        children: ChildTable,
        forker: Forker,
        admission: Admission,
        limits: ChildLimits | None,
        on_error: Callable[[Any, Any], None],
    ) -> None:
        self._gate = gate
        self._settings = settings
        self._children = children
        self._forker = forker
        self._admission = admission
        self._limits = limits
        self._on_error = on_error
        self._refuse_when_full = settings.when_full == "refuse"
        # Waiting for a slot: a UDP socket dup, the datagram, its sender, the service.
        self.queued: deque[tuple[int, bytes, int, Any, Service]] = deque()

    def fds(self) -> Iterator[int]:
        """The UDP socket dups held for queued datagrams (a new child closes them)."""
        for waiting in self.queued:
            yield waiting[0]

    def receive(self, listener: Listener) -> bool:
        """Read one datagram from *listener* and fork its child; False when
        none was waiting."""
        try:
            data, peer = listener.sock.recvfrom(DATAGRAM_MAX)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            # ECONNREFUSED and the like: an ICMP error for an earlier reply.
            return True
        gate = self._gate
        gate.accepted += 1
        family = listener.family
        if self._admission.enabled:
            reason = self._admission.check(family, peer, gate.busy_children())
            if reason is not None:
                gate.refusals.drop_datagram(family, peer, reason)
                return True
        service = listener.service
        if not self.answer(listener.fileno(), data, family, peer, service):
            waits = gate.stopping or not self._refuse_when_full
            if waits and len(self.queued) < self._settings.backlog:
                # The stop's drain, or read just as the last slot went (a spare
                # counted idle took a connection of its own): answered as
                # children exit, as connections are.
                self.queue((os.dup(listener.fileno()), data, family, peer, service))
            else:
                gate.refusals.drop_datagram(family, peer, "full")
        if not gate.can_accept():
            gate.pause()
        return True

    def queue(self, entry: tuple[int, bytes, int, Any, Service]) -> None:
        self.queued.append(entry)
        self._forker.changed()

    def answer(
        self, fd: int, data: bytes, family: int, peer: Any, service: Service, owned: bool = False
    ) -> bool:
        """Give a datagram to an idle spare, or fork a child for it, with UDP
        socket *fd* (closed here if *owned*); False at max_children."""
        spares = self._gate.spares
        if (
            spares is not None
            and spares.waiting()
            and spares.hand_off(fd, family, peer, service, data)
        ):
            if self._admission.enabled:
                self._admission.opened(self._admission.source(family, peer))
        elif len(self._children) >= self._settings.max_children:
            return False
        else:
            self._spawn(fd, data, family, peer, service)
        if owned:
            os.close(fd)
        return True

    def _spawn(self, fd: int, data: bytes, family: int, peer: Any, service: Service) -> None:
        closes = self._forker.closes()
        try:
            pid = self._forker.fork()
        except OSError as exc:
            consequence = f"dropping a datagram from {format_address(family, peer)}"
            self._gate.fork_failed_backing_off(exc, consequence)
            self._gate.refusals.drop_datagram(family, peer, "fork_failed")
            return
        if pid == 0:
            limits = self._limits
            become(
                closes, self._forker.signals, limits, family, peer,
                # its own copy: the parent's fds, this socket among them, are closed first
                answer, os.dup(fd), data, family, peer, service.run, self._on_error, limits,
            )  # fmt: skip
        child = self._children.add(pid, family, peer, time.monotonic())
        if self._gate.per_child_work:
            self._gate.serving_starts(child)
            self._admission.opened(child.source)

    def dispatch_queued(self) -> None:
        """Answer the datagrams waiting for a slot, as long as there is room."""
        while self.queued:
            entry = self.queued.popleft()
            self._forker.changed()
            if not self.answer(*entry, owned=True):
                self.queued.appendleft(entry)
                self._forker.changed()
                break

    def drop_queued(self, why: str) -> None:
        if self.queued:
            logger.warning("dropping %d queued datagrams unanswered: %s", len(self.queued), why)
        while self.queued:
            os.close(self.queued.popleft()[0])
        self._forker.changed()
