"""Accepting: accept() or recvfrom(), admit or refuse, fork, and queue at the limit.

A listener's callback accepts one connection per readiness event (epoll is
level-triggered, so a listener with more waiting is reported again at once;
ending in EAGAIN would cost an exception per wakeup, pages each fork copies).
The default path (no admission rules, no PROXY protocol, no spares) is:
accept, fork, close the parent's copy, watch the child.

At max_children the listeners leave the loop (the kernel's backlog holds
the clients) until a child exits, or, with ``when_full = "refuse"``, each
connection over the limit gets the busy message.  Out of descriptors
(EMFILE), accepting pauses for BACKOFF_SECONDS; when fork() fails, no fork
is tried for as long, and connections meanwhile wait or are refused at once.
"""

from __future__ import annotations

import os
from collections import deque
from time import monotonic

from .. import log
from ..child.start import become
from ..child.stream import serve
from ..listeners import BACKOFF_SECONDS
from .backoff import Backoff
from .datagrams import Datagrams
from .proxied import Proxied
from .refusals import Refusals

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    from ..admission import Admission
    from ..child.limits import ChildLimits
    from ..config import Settings
    from ..listeners import Listener
    from ..service import Service
    from .children import Child, ChildTable
    from .fork import Forker
    from .loop import Loop
    from .spares import Spares

__all__ = ["Acceptor"]

logger = log.get_logger(__name__)


class Acceptor:
    """The listeners' side of the parent: from a readable listener to a child."""

    def __init__(
        self,
        settings: Settings,
        loop: Loop,
        children: ChildTable,
        forker: Forker,
        admission: Admission,
        limits: ChildLimits | None,
        run: Callable[[Any, Any], None],
        on_error: Callable[[Any, Any], None],
    ) -> None:
        self.settings = settings
        self._loop = loop
        self._children = children
        self._forker = forker
        self._admission = admission
        self._limits = limits
        self._run = run  # the server's finish_request: the default handler
        self.on_error = on_error
        self._max_children = settings.max_children
        self._refuse_when_full = settings.when_full == "refuse"
        self.refusals = Refusals(settings.busy_message, settings.access_log)
        self.spares: Spares | None = None  # set by the server with spare_children
        self.proxied = Proxied(self, settings, loop, forker, children)  # PROXY headers being read
        self.listeners: list[Listener] = []
        self.accepted = 0
        self.fork_failures = 0
        self.listening = False
        self.stopping = False
        self.held = False  # a reload waits for PROXY headers: accept nothing new
        # Out of descriptors or processes: the listeners pause a moment.
        self.backoff = Backoff(loop, self.refusals, self.pause, self._resume_after_backoff)
        self._fork_retry_at = 0.0  # fork() failed: no fork tried before then
        # Connections (and datagrams) waiting for a slot: at a stop's drain,
        # or handed back from the spares.
        self.queued: deque[tuple[int, int, Any, Service | None]] = deque()
        # Whether a new child needs anything beyond the child table: one flag,
        # so the default path reads one attribute.
        self.per_child_work = admission.enabled or bool(settings.max_lifetime)
        self._callbacks: dict[Listener, Callable[[int], None]] = {}
        self.datagrams = Datagrams(self, settings, children, forker, admission, limits, on_error)
        # A Server that overrides socketserver's request hooks: each listener's
        # callback comes from there (hooks.py), chosen once in start().
        self.request_path: Callable[[Listener], Callable[[int], None]] | None = None
        forker.parent_only(self._fds)

    # -- setup -----------------------------------------------------------------

    def start(self, listeners: list[Listener]) -> None:
        """Before the first fork: choose each listener's callback once."""
        self.listeners = listeners
        for listener in listeners:
            service = listener.service
            if self.request_path is not None:
                callback = self.request_path(listener)
            elif listener.datagram:
                callback = _bind(self.datagrams.receive, listener)
            elif service is not None and service.trusted is not None:
                callback = _bind(self._on_proxied, listener)
            elif self._admission.enabled or self.spares is not None:
                callback = _bind(self._on_connection, listener)
            else:
                callback = self._plain(listener)
            self._callbacks[listener] = callback
        if any(lis.service is not None and lis.service.trusted is not None for lis in listeners):
            self.proxied.start()

    def finish(self) -> None:
        """After the loop: what waits is closed; ready for another start()."""
        self.drop_queued("the loop ended")  # only after an exception
        self.proxied.finish()
        self.backoff.cancel()
        self.listening = self.held = False

    def changed(self) -> None:
        """The parent holds other fds now (the forker recomputes what a child closes)."""
        self._forker.changed()

    def _fds(self) -> Iterator[int]:
        """What a new child closes of ours: listeners, other clients' connections."""
        for listener in self.listeners:
            if not listener.closed:
                yield listener.fileno()
        for queued in self.queued:
            yield queued[0]
        yield from self.datagrams.fds()
        yield from self.proxied.fds()

    # -- streams -----------------------------------------------------------------

    def _plain(self, listener: Listener) -> Callable[[int], None]:
        """The default path's callback for *listener*: accept, fork, close."""
        accept = listener.sock._accept  # type: ignore[attr-defined]
        # int(): the AddressFamily member was one more page copied per connection.
        family, service = int(listener.family), listener.service  # its own handler, or TLS
        live = self._children.by_pid  # len() of the dict: no Python call (children.py)

        def on_readable(_: int) -> None:
            try:
                fd, peer = accept()
            except (BlockingIOError, InterruptedError):
                return  # reset by the peer before we got to it, or a spurious wakeup
            except OSError as exc:
                self.accept_failed(listener, exc)
                return
            self.accepted += 1
            if len(live) < self._max_children:
                if not self._spawn(fd, family, peer, service):
                    self._unforked(fd, family, peer, service)
            elif self._refuse_when_full:
                self.refusals.refuse(fd, family, peer, "full")
            else:
                self.queued.append((fd, family, peer, service))
                self._forker.changed()
            if not self._refuse_when_full and len(live) >= self._max_children:
                self.pause()

        return on_readable

    def _accept_one(self, listener: Listener) -> tuple[int, Any] | None:
        try:
            fd, peer = listener.sock._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self.accept_failed(listener, exc)
            return None
        self.accepted += 1
        return fd, peer

    def _on_connection(self, listener: Listener) -> None:
        """Accept with admission rules or spares configured."""
        got = self._accept_one(listener)
        if got is not None:
            fd, peer = got
            self.take(fd, listener.family, peer, listener.service)
            if not self.can_accept():
                self.pause()

    def _on_proxied(self, listener: Listener) -> None:
        """A PROXY protocol listener: admission waits for the header (headers.py)."""
        got = self._accept_one(listener)
        if got is not None:
            self.proxied.wait_for_header(listener, *got)
            if not self.can_accept():
                self.pause()

    def take(self, fd: int, family: int, peer: Any, service: Service | None = None) -> None:
        """An accepted connection (counted by the caller): admit it (or refuse
        it), then give it a child, or queue it until a child exits."""
        if self._admission.enabled:
            reason = self._admission.check(family, peer, self.busy_children())
            if reason is not None:
                self.refusals.refuse(fd, family, peer, reason)
                return
        if not self._dispatch(fd, family, peer, service):
            if self._refuse_when_full:
                reason = "fork_failed" if self._fork_retry_at else "full"
                self.refusals.refuse(fd, family, peer, reason)
                return
            # At max_children while stopping (or a full handoff queue): the
            # next child to exit makes room for it.
            self.queued.append((fd, family, peer, service))
            self._forker.changed()

    def _dispatch(self, fd: int, family: int, peer: Any, service: Service | None) -> bool:
        """Give accepted connection *fd* to an idle spare, or fork a child for
        it; False when neither is possible (max_children reached)."""
        spares = self.spares
        if spares is not None and spares.waiting() and spares.hand_off(fd, family, peer, service):
            if self._admission.enabled:
                self._admission.opened(self._admission.source(family, peer))
            return True
        if len(self._children) >= self._max_children:
            return False
        return self._spawn(fd, family, peer, service)

    def _spawn(self, fd: int, family: int, peer: Any, service: Service | None) -> bool:
        """Fork a child for *fd*; False if fork() failed (now, or within the backoff)."""
        if self._fork_retry_at and monotonic() < self._fork_retry_at:
            return False  # fork() failed a moment ago; one attribute on the default path
        closes = self._forker.closes()
        try:
            pid = self._forker.fork()
        except OSError as exc:
            # "refuse": each connection until the retry is refused at once (one
            # per backoff left a flood waiting: 33 took 3.2 s); "wait": the
            # listeners pause, the backlog and the queue hold them.
            self._fork_retry_at = monotonic() + BACKOFF_SECONDS
            held = "refusing" if self._refuse_when_full else "holding"
            self.fork_failed(exc, f"{held} connections for {BACKOFF_SECONDS:g}s")
            if not self._refuse_when_full:
                self.back_off()
            return False
        if pid == 0:
            run = self._run if service is None else service.run
            limits = self._limits
            become(
                closes, self._forker.signals, limits, family, peer,
                serve, fd, family, peer, run, self.on_error, limits, service,
            )  # fmt: skip
        # close() only drops a reference: if the parent kept its copy, the
        # client would never see EOF when the child is done.
        os.close(fd)
        child = self._children.add(pid, family, peer, monotonic())
        if self.per_child_work:
            self.serving_starts(child)
            self._admission.opened(child.source)
        return True

    def _unforked(self, fd: int, family: int, peer: Any, service: Service | None) -> None:
        """No fork for *fd* now: refused, or queued until the retry (when_full)."""
        if self._refuse_when_full:
            self.refusals.refuse(fd, family, peer, "fork_failed")
        else:
            self.queued.append((fd, family, peer, service))
            self._forker.changed()

    def serving_starts(self, child: Child) -> None:
        """*child* now serves a connection: note the source it counts against,
        and start its max_lifetime."""
        if self._admission.enabled:
            child.source = self._admission.source(child.family, child.peer)
        if self.settings.max_lifetime:
            s = self.settings
            self._children.limit_lifetime(child, s.max_lifetime, s.kill_timeout)

    def busy_children(self) -> int:
        """The load admission judges: children serving, not idle spares."""
        spares = self.spares
        return len(self._children) - (spares.idle_count() if spares is not None else 0)

    # -- the limit: pause, resume, queue -------------------------------------------

    def can_accept(self) -> bool:
        """Whether to accept now: a connection would get a child at once, or
        when_full = "refuse" (it would get the busy message)."""
        spares = self.spares
        # (Enough connections waiting for a PROXY header pause the PROXY
        # listeners alone: proxied.py.)
        return (
            self._refuse_when_full
            or len(self._children) < self._max_children
            or (spares is not None and spares.waiting())
        )

    def pause(self) -> None:
        """Stop watching the listeners (those the spares accept from are theirs)."""
        if not self.listening:
            return
        direct = self.spares.direct if self.spares is not None else {}
        for listener in self.listeners:
            if listener not in direct and not listener.closed:
                self._loop.remove_reader(listener.fileno())
        self.listening = False
        if self.spares is not None:
            self.spares.sync_direct()

    def resume(self) -> None:
        """Watch the listeners again, if there is room and nothing holds us back."""
        if self.spares is not None:
            self.spares.fill()
        if self.listening or self.stopping or self.held or self.backoff.active:
            return
        if not self.can_accept():
            return
        direct = self.spares.direct if self.spares is not None else {}
        for listener in self.listeners:
            if listener not in direct and listener not in self.proxied.paused:
                self._loop.add_reader(listener.fileno(), self._callbacks[listener])
        self.listening = True
        if self.spares is not None:
            self.spares.sync_direct()

    def watch_direct(self, listener: Listener, watch: bool) -> None:
        """For the spares: watch a listener they accept from while none of them is idle."""
        if watch:
            self._loop.add_reader(listener.fileno(), self._callbacks[listener])
        else:
            self._loop.remove_reader(listener.fileno())

    def slot_freed(self, child: Child) -> None:
        """A child exited: serve what waits for a slot, or listen again."""
        if self.per_child_work:
            self._admission.closed(child.source)
        self._fork_retry_at = 0.0  # an exiting child frees a process
        if self.queued or self.datagrams.queued:
            self.dispatch_queued()
        if not self.listening and not self.stopping:
            # An exiting child may also have freed descriptors (ENFILE) or
            # processes (fork's EAGAIN): try again now.
            self.backoff.end_early()
            self.resume()

    def dispatch_queued(self) -> None:
        """Give the connections and datagrams waiting for a slot their child,
        as long as there is room."""
        while self.queued:
            # Off the queue before its child is forked: a new child closes
            # every queued fd, as other clients' connections.
            entry = self.queued.popleft()
            self._forker.changed()  # its child keeps it
            if not self._dispatch(*entry):
                self.queued.appendleft(entry)
                self._forker.changed()
                break
        self.datagrams.dispatch_queued()

    def drop_queued(self, why: str) -> None:
        if self.queued:
            logger.warning("closing %d queued connections unserved: %s", len(self.queued), why)
        while self.queued:
            os.close(self.queued.popleft()[0])
        self.datagrams.drop_queued(why)
        self._forker.changed()

    # -- failures ----------------------------------------------------------------

    def accept_failed(self, listener: Listener, exc: OSError) -> None:
        """accept() on *listener* failed: skip that connection, or back off."""
        self.backoff.accept_failed(listener.name, exc)

    def back_off(self) -> None:
        """Pause accepting for BACKOFF_SECONDS (or until a child exits)."""
        self.backoff.start()

    def _resume_after_backoff(self) -> None:
        self._fork_retry_at = 0.0
        if self.queued:  # held while fork() failed
            self.dispatch_queued()
        self.resume()

    def fork_failed_backing_off(self, exc: OSError, consequence: str) -> None:
        """A fork for a connection or datagram failed: count, log, back off."""
        self.fork_failed(exc, consequence)
        # EAGAIN/ENOMEM pass when children exit: give them a moment.
        self.back_off()

    def fork_failed(self, exc: OSError, consequence: str) -> None:
        """Count and log (at most once per interval) a failed fork."""
        self.fork_failures += 1
        self.refusals.fork_failed(exc, consequence)


def _bind(method: Callable[[Listener], Any], listener: Listener) -> Callable[[int], None]:
    """A loop callback (called with the fd) that runs ``method(listener)``."""
    return lambda _fd: method(listener)
