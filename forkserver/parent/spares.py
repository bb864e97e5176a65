"""The parent's half of ``spare_children``: fork spares, hand connections over, replace them.

With ``spare_children = N`` the parent keeps N children forked before any
connection exists, so no connection waits for a fork.  Each spare is still
used once: it serves exactly one connection and exits, and the parent forks a
fresh replacement.  Spares accept from the *direct* listeners themselves
(child/spare.py); the parent watches those only while no spare is idle, to
fork on accept (or refuse) as without spares.  Connections from the other
listeners (PROXY, admission rules, UDP) the parent hands over on the handoff
socket (handoff.py), and each spare reports on the busy pipe which connection
it took.
"""

from __future__ import annotations

import os
import select
import sys
import time
from socket import AF_UNIX, SCM_RIGHTS, SOCK_SEQPACKET, SOL_SOCKET, socketpair

from .. import log
from ..child.spare import wait_and_serve
from ..child.start import become
from ..handoff import BUSY_RECORD, decode_busy, encode_peer, message_size, reclaim
from ..listeners import BACKOFF_SECONDS
from .accounting import describe_status

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from socket import socket as Socket
    from typing import Any

    from ..child.limits import ChildLimits
    from ..config import Settings
    from ..listeners import Listener
    from ..service import Service
    from .children import Child, ChildTable
    from .fork import Forker
    from .loop import Loop, Timer

__all__ = ["Spares"]

logger = log.get_logger(__name__)

SPARE_BACKOFF_MAX = 10.0  # seconds: the longest wait to replace a failing spare
TOP_UP_DELAY = 0.05  # seconds after a handoff: fork the rest of the spares
# Read whole records only: records are written atomically, so a read whose
# size is a multiple of the record size never splits one.
_BUSY_READ = BUSY_RECORD.size * 2048


class Spares:
    """Idle spares, what was handed to them, and the listeners they accept from."""

    def __init__(
        self,
        settings: Settings,
        loop: Loop,
        children: ChildTable,
        forker: Forker,
        run: Callable[[Any, Any], None],
        on_error: Callable[[Any, Any], None],
        limits: ChildLimits | None,
    ) -> None:
        self._settings = settings
        self._loop = loop
        self._children = children
        self._forker = forker
        self._run = run
        self._on_error = on_error
        self._limits = limits
        self._idle: set[int] = set()  # spares not yet known to hold a connection
        self._in_transit = 0  # connections handed off, not yet reported busy
        self._handoff: Socket | None = None  # the parent's end
        self._handoff_child = self._busy_r = self._busy_w = -1
        self._refill: Timer | None = None  # a spare's fork failed: retry then
        # Spares dying before any connection (a setup that cannot succeed: a
        # sandbox forbidding what a spare needs): replaced after this long,
        # doubled at each such death up to SPARE_BACKOFF_MAX, 0 once one serves.
        self._failing = 0.0
        self._top_up: Timer | None = None  # fork the spares not replaced at handoff
        self._services: list[Service] = []
        # Listeners the spares accept from themselves, each with its service's
        # index + 1 (0: none); watched by the parent only while no spare is idle.
        self.direct: dict[Listener, int] = {}
        self._watching_direct = False
        self.accepted = 0  # connections spares accepted themselves
        # Set by the server: may the parent watch the direct listeners now
        # (accepting, and room to)?  And how to watch one, start a connection's
        # bookkeeping, report a failed fork.
        self.may_watch: Callable[[], bool] = lambda: False
        self.watch: Callable[[Listener, bool], None] = lambda listener, watch: None
        self.serving_starts: Callable[[Child], None] | None = None  # None: nothing to start
        self.fork_failed: Callable[[OSError, str], None] = lambda exc, what: None
        forker.parent_only(self._private_fds)
        forker.shared_with_spares(self._shared_fds)

    @property
    def idle(self) -> set[int]:
        return self._idle

    def start(self, listeners: list[Listener], services: list[Service], direct: bool) -> None:
        """Before the first fork: the handoff socket and busy pipe; with
        *direct*, the spares accept from every listener that needs nothing
        from the parent first."""
        self._services = services
        self._busy_r, self._busy_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        ours, theirs = socketpair(AF_UNIX, SOCK_SEQPACKET)
        ours.setblocking(False)  # a full queue means: fork instead
        self._handoff, self._handoff_child = ours, theirs.detach()
        self._forker.changed()
        self._loop.add_reader(self._busy_r, lambda _fd: self._read_busy())
        self._busy_poll = select.poll()
        self._busy_poll.register(self._busy_r, select.POLLIN)
        if direct:
            # Admission rules and PROXY headers need the parent to see a
            # connection first; every other stream listener needs nothing from it.
            self.direct = {
                lis: self._index(lis.service)
                for lis in listeners
                if not lis.datagram and (lis.service is None or lis.service.trusted is None)
            }

    def _direct_fds(self) -> set[int]:
        """The listeners a spare accepts from: it keeps them."""
        return {listener.fileno() for listener in self.direct}

    def _private_fds(self) -> Iterator[int]:
        if self._handoff is not None:
            yield self._handoff.fileno()
        if self._busy_r >= 0:
            yield self._busy_r

    def _shared_fds(self) -> Iterator[int]:
        for fd in (self._handoff_child, self._busy_w):
            if fd >= 0:
                yield fd

    def _index(self, service: Service | None) -> int:
        """How a spare names *service*: its index in services, plus one; 0: none."""
        return 0 if service is None else self._services.index(service) + 1

    def waiting(self) -> bool:
        """Whether a spare waits for a connection to be handed over (none
        once retired, at a stop or a reload)."""
        return len(self._idle) > self._in_transit and self._handoff is not None

    def idle_count(self) -> int:
        """Spares idle and not yet handed anything."""
        return len(self._idle) - self._in_transit

    def hand_off(
        self,
        fd: int,
        family: int,
        peer: Any,
        service: Service | None,
        datagram: bytes | None = None,
    ) -> bool:
        """Send connection *fd* to an idle spare, or with *datagram* the UDP
        socket *fd* and a datagram to answer; False if it cannot."""
        assert self._handoff is not None
        if self.direct:
            # Spares also accept by themselves: one counted idle may just
            # have, and what is handed to it waits for the next spare.
            self.catch_up(refill=False)
            if not self.waiting():
                return False
        try:
            self._handoff.sendmsg(
                [encode_peer(family, peer, self._index(service)), datagram or b""],
                [(SOL_SOCKET, SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))],
            )
        except OSError:  # the queue is full (spares are slow to start): fork instead
            return False
        # The spare received its own copy: close() only drops ours (and the
        # UDP socket stays the parent's).
        if datagram is None:
            os.close(fd)
        self._in_transit += 1
        self.fill(low_water=True)
        return True

    def fill(self, low_water: bool = False) -> None:
        """Fork spares until spare_children wait idle (within max_children).

        With *low_water* (a spare just took a connection), only up to half of
        them; the rest when a child exits, or TOP_UP_DELAY later.  A fork
        (20 ms with a 1 GB parent) run while the connection that took the
        spare is being served competes with it for the CPU; once the child has
        exited (or the connection is long-lived), the parent has nothing
        better to do."""
        spares, limit = self._settings.spare_children, self._settings.max_children
        if low_water:
            spares = max(1, spares // 2)
            if self._top_up is None:
                self._top_up = self._loop.call_later(TOP_UP_DELAY, self._topped_up)
        elif self._top_up is not None:
            self._loop.cancel(self._top_up)
            self._top_up = None
        children = self._children.by_pid  # len() of the dict: no Python call (children.py)
        while (
            len(self._idle) - self._in_transit < spares
            and len(children) < limit
            and self._refill is None
            and self._handoff is not None
        ):
            if not self._spawn():
                break
        self.sync_direct()

    def _topped_up(self) -> None:
        self._top_up = None
        self.fill()

    def _spawn(self) -> bool:
        """Fork a spare that waits for one connection."""
        closes = self._forker.spare_closes(self._direct_fds)
        try:
            pid = self._forker.fork()
        except OSError as exc:
            # Idle spares may still serve: keep accepting, retry the refill later.
            self.fork_failed(exc, "no spare started")
            self._refill = self._loop.call_later(BACKOFF_SECONDS, self._refilled)
            return False
        if pid == 0:
            limits = self._limits
            become(
                closes, self._forker.signals, limits, 0, None,
                wait_and_serve, self._handoff_child, self._busy_w, self._run, self._on_error,
                limits, self._services, self.direct,
            )  # fmt: skip
        self._children.add(pid, 0, None, time.monotonic())
        self._idle.add(pid)
        return True

    def _refilled(self) -> None:
        self._refill = None
        self.fill()

    def sync_direct(self) -> None:
        """Watch the direct listeners while no spare is idle (to fork on
        accept, or refuse, as without spares), and leave them to the spares
        otherwise: the parent stays off the connection's path."""
        if not self.direct:
            return
        watch = not self.waiting() and self.may_watch()
        if watch == self._watching_direct:
            return
        for listener in self.direct:
            if not listener.closed:
                self.watch(listener, watch)
        self._watching_direct = watch

    def catch_up(self, refill: bool = True) -> None:
        """Read the busy records already written, before reaping (a spare that
        served and exited quickly is logged with its client, not as an idle
        spare) and before a handoff (to a spare known to be idle)."""
        if self._busy_r >= 0 and self._busy_poll.poll(0):
            self._read_busy(refill)

    def _read_busy(self, refill: bool = True) -> None:
        """Spares that accepted a connection: note whom they serve, replace
        them (unless not *refill*: the caller holds a connection no list
        has yet, which a spare forked now would keep open)."""
        try:
            data = os.read(self._busy_r, _BUSY_READ)
        except BlockingIOError:
            return
        now = time.monotonic()
        self._failing = 0.0  # spares get connections: their setup works
        for pid, direct, family, peer in decode_busy(data):
            if direct:  # it accepted the connection itself
                self.accepted += 1
            else:
                self._in_transit = max(0, self._in_transit - 1)
            self._idle.discard(pid)
            child = self._children.by_pid.get(pid)
            if child is not None:
                child.family, child.peer, child.started = family, peer, now
                if self.serving_starts is not None:
                    self.serving_starts(child)  # counted against its source at handoff
        if refill:
            self.fill(low_water=True)

    def gone(self, child: Child) -> None:
        """After a reap: an idle spare that exited is no longer waiting."""
        if child.pid in self._idle:
            self._idle.discard(child.pid)
            # An idle spare exits 0 only when retired; one that died
            # otherwise may have taken a connection it never reported.
            # Counting one too few heals itself (the idle spares still
            # take what is queued); one too many would keep a phantom
            # spare, or at max_children stop accepting for good.
            if child.status != 0 and self._in_transit:
                self._in_transit -= 1
            if child.status != 0 and self._handoff is not None:
                self._spare_failed(child)
        self._in_transit = min(self._in_transit, len(self._idle))

    def _spare_failed(self, child: Child) -> None:
        """An idle spare died (not retired): replace it later, not now, or a
        spare whose setup always fails would be forked and fail in a loop."""
        self._failing = min(SPARE_BACKOFF_MAX, max(BACKOFF_SECONDS, self._failing * 2))
        if self._refill is not None:
            self._loop.cancel(self._refill)
        self._refill = self._loop.call_later(self._failing, self._refilled)
        logger.warning(
            "a spare (pid %d) %s before it had a connection; the next in %.1fs",
            child.pid, describe_status(child.status), self._failing,
        )  # fmt: skip

    def refill_now(self) -> None:
        """A child exited: fork what a failed fork left missing, now (not
        what failing spares left missing: those wait for their backoff)."""
        if self._refill is not None and not self._failing:
            self._loop.cancel(self._refill)
            self._refill = None
        self.fill()

    def retire(self) -> list[tuple[int, int, Any, Service | None, bytes]]:
        """Close our end of the handoff socket: idle spares read EOF and exit.
        Returns what is still queued in it, taken back, as (fd, family, peer,
        service, datagram): it may have been handed to a spare that took a
        connection of its own meanwhile; the caller gets it a child."""
        if self._handoff is None:
            return []
        self._handoff.close()
        self._handoff = None
        self._forker.changed()
        taken = []
        for fd, family, peer, index, datagram in reclaim(
            self._handoff_child, message_size(self._services)
        ):
            self._in_transit = max(0, self._in_transit - 1)
            taken.append((fd, family, peer, self._services[index - 1] if index else None, datagram))
        return taken

    def close(self) -> None:
        """After the loop: every fd of ours, closed; nothing watched."""
        self.retire()
        if self._busy_r >= 0:
            self._loop.remove_reader(self._busy_r)
        for fd in (self._busy_r, self._busy_w, self._handoff_child):
            if fd >= 0:
                os.close(fd)
        self._handoff_child = self._busy_r = self._busy_w = -1
        self._forker.changed()
        self._idle.clear()
        self._in_transit = 0
        self.direct = {}
        self._watching_direct = False
        for timer in (self._refill, self._top_up):
            self._loop.cancel(timer)
        self._refill = self._top_up = None
