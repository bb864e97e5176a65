"""Stopping: graceful (drain, then wait for the children) or immediate (kill them).

A graceful stop (SIGTERM, SIGINT, ``shutdown()``) stops accepting, takes in
what the kernel already queued so that closing the listeners resets no
client, and waits up to ``graceful_timeout`` for the children; then SIGTERM,
and ``kill_timeout`` later SIGKILL.  An immediate stop (SIGQUIT, or a second
SIGTERM) kills the children at once.  The loop ends when no child, no queued
connection and no PROXY header being read is left.
"""

from __future__ import annotations

import signal
from socket import SHUT_RD

from .. import log, systemd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..config import Settings
    from ..listeners import Listener
    from .accept import Acceptor
    from .children import ChildTable
    from .loop import Loop, Timer
    from .spares import Spares

__all__ = ["Stopper"]

logger = log.get_logger(__name__)


class Stopper:
    """Begins a stop, runs its deadlines, and ends the loop when it is done."""

    def __init__(
        self,
        settings: Settings,
        loop: Loop,
        acceptor: Acceptor,
        children: ChildTable,
        spares: Spares | None,
    ) -> None:
        self._settings = settings
        self._loop = loop
        self._acceptor = acceptor
        self._children = children
        self._spares = spares
        self.stopping = False
        self._term: Timer | None = None
        self._kill: Timer | None = None
        # Called once when a stop begins, with whether it is an upgrade's
        # handover (the metrics listener is let go at a handover, else kept
        # until the end for /healthz; a new parent not yet ready is stopped too).
        self.on_stop: list[Callable[[bool], None]] = []

    def begin(
        self, immediate: bool = False, close_listeners: bool = True, handover: bool = False
    ) -> None:
        """Stop accepting and begin the stop; *immediate* kills the children now."""
        acceptor = self._acceptor
        if not self.stopping:
            self.stopping = acceptor.stopping = True
            if not handover:  # after an upgrade, the new parent is the service
                systemd.notify("STOPPING=1")
            for hook in self.on_stop:
                hook(handover)
            acceptor.pause()
            # Before the drain: a spare the parent still counts as idle may
            # have accepted a connection itself, and a drained connection
            # handed to it would wait for a spare that never comes.  Drained
            # connections get a child forked for them instead.
            self.take_back_from_spares()
            if not immediate:  # else dropped below, with the children killed
                acceptor.dispatch_queued()
            if handover:
                # The new parent accepts from the same queues: leave them (and
                # the Unix socket files) to it, just let go of our copies.
                for listener in acceptor.listeners:
                    listener.hand_over()
                acceptor.changed()
            elif close_listeners:
                if not immediate:
                    self._drain_backlog()
                for listener in acceptor.listeners:
                    listener.close_and_unlink()
                acceptor.changed()
            if immediate and acceptor.proxied.reader:
                acceptor.proxied.reader.close_all("stopping now")
            if not immediate:
                self._term = self._loop.call_later(self._settings.graceful_timeout, self._term_due)
                logger.info(
                    "stopping: no longer accepting; waiting up to %.1fs for %d children",
                    self._settings.graceful_timeout,
                    len(self._children) + len(acceptor.queued),
                )
            self._loop.after_batch = self.check_done
        if immediate:
            logger.info("stopping now: killing %d children", len(self._children))
            self._loop.cancel(self._term)
            self._term = None
            acceptor.drop_queued("immediate stop")
            self._children.signal_all(signal.SIGKILL)

    def _drain_backlog(self) -> None:
        """Take in connections the kernel already queued, so closing the
        listeners does not reset them; serve each as a slot frees up."""
        acceptor, backlog = self._acceptor, self._settings.backlog
        drained: list[tuple[int, Any, Listener]] = []
        for listener in acceptor.listeners:
            listener.refuse_new()
        for listener in acceptor.listeners:
            if listener.datagram:
                for _ in range(backlog):
                    if not acceptor.datagrams.receive(listener):
                        break
                continue
            while len(drained) + len(acceptor.queued) < backlog:
                try:
                    fd, peer = listener.sock._accept()  # type: ignore[attr-defined]
                except OSError:
                    break
                acceptor.accepted += 1
                drained.append((fd, peer, listener))
            # Stop listening in every process at once: a child forked a moment
            # ago holds a copy of the listener until it gets to close it, and
            # what the kernel queued on that copy would be reset then. Only
            # after the accepts: shutdown() resets what is still queued (and
            # since refuse_new(), nothing new joins the queue).
            try:
                listener.sock.shutdown(SHUT_RD)
            except OSError:
                pass  # not connected: some kernels refuse it on a Unix listener
        for fd, peer, listener in drained:  # forks only now, the window above stays short
            service = listener.service
            if service is not None and service.trusted is not None:  # PROXY: header first
                acceptor.proxied.wait_for_header(listener, fd, peer)
            else:
                acceptor.take(fd, listener.family, peer, service)

    def take_back_from_spares(self) -> None:
        """Retire the spares; what was handed to them and not taken waits
        in the acceptor's queues for a forked child."""
        if self._spares is None:
            return
        for fd, family, peer, service, datagram in self._spares.retire():
            if service is not None and service.datagram:
                self._acceptor.datagrams.queue((fd, datagram, family, peer, service))
            else:
                self._acceptor.queued.append((fd, family, peer, service))
            self._acceptor.changed()

    def _term_due(self) -> None:
        self._term = None
        self._kill = self._loop.call_later(self._settings.kill_timeout, self._kill_due)
        self._acceptor.drop_queued("graceful_timeout expired")
        if self._children:
            logger.warning(
                "graceful_timeout (%.1fs) expired: sending SIGTERM to %d children",
                self._settings.graceful_timeout,
                len(self._children),
            )
            self._children.signal_all(signal.SIGTERM)

    def _kill_due(self) -> None:
        self._kill = None
        if self._children:
            logger.warning("sending SIGKILL to %d children", len(self._children))
            self._children.signal_all(signal.SIGKILL)

    def check_done(self) -> None:
        """After each batch while stopping: end the loop once nothing is left."""
        acceptor = self._acceptor
        if (
            self.stopping
            and not self._children
            and not acceptor.queued
            and not acceptor.datagrams.queued
            and not acceptor.proxied.reader
        ):
            logger.info("stopped: all children have exited")
            self._loop.stop()

    def reset(self) -> None:
        """After the loop: ready for another serve_forever()."""
        self.stopping = self._acceptor.stopping = False
        for timer in (self._term, self._kill):
            self._loop.cancel(timer)
        self._term = self._kill = None
