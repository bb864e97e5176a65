"""The metrics listener: accept a scrape and fork a child to answer it.

The parent computes nothing for a scrape: the child it forks reads the
parent's state from its own copy of the parent's memory (metrics/snapshot.py),
so a slow or hostile scraper holds up no one.  At most MAX_SCRAPES answer at
once; more are closed unanswered.
"""

from __future__ import annotations

import os

from .. import log
from ..child.start import become
from ..child.stream import serve
from ..listeners import SKIPPED_ACCEPT_ERRNOS
from .accounting import describe_status

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from socket import socket as Socket
    from typing import Any

    from ..child.limits import ChildLimits
    from ..listeners import Listener
    from .accept import Acceptor
    from .children import ChildTable
    from .fork import Forker
    from .loop import Loop

__all__ = ["MAX_SCRAPES", "Scraper"]

logger = log.get_logger(__name__)

MAX_SCRAPES = 4  # scrape children at once; more are closed unanswered


class Scraper:
    """Answers each request on the metrics listener in a child of its own."""

    def __init__(
        self,
        listener: Listener,
        loop: Loop,
        children: ChildTable,
        forker: Forker,
        acceptor: Acceptor,
        answer: Callable[[Socket, Any], None],
        on_error: Callable[[Socket, Any], None],
        limits: ChildLimits | None,
    ) -> None:
        self.listener = listener
        self._loop = loop
        self._children = children
        self._forker = forker
        self._acceptor = acceptor
        self._answer = answer
        self._on_error = on_error
        self._limits = limits  # as the children's user, who can read their memory
        self._scrapes = 0  # scrape children alive
        forker.parent_only(self._fds)

    def _fds(self) -> Iterator[int]:
        if not self.listener.closed:
            yield self.listener.fileno()

    def paused(self, paused: bool) -> None:
        """Stop (or go on) answering: out of descriptors, like the listeners."""
        if self.listener.closed:
            return
        fd = self.listener.fileno()
        if paused:
            self._loop.remove_reader(fd)
        elif not self._loop.watching(fd):
            self._loop.add_reader(fd, self._scrape)

    def stop_began(self, handover: bool) -> None:
        """A stop began: keep answering until the loop ends, so that /healthz
        says 503 throughout the drain.  At an upgrade's handover, let go at
        once: the new parent accepts on the same socket and is the one
        serving, so a health check must reach it, not a parent on its way out."""
        if handover:
            self.close()

    def close(self) -> None:
        """No more scrapes: after the loop, or at a handover."""
        if not self.listener.closed:
            self._loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self._forker.changed()

    def _scrape(self, _: int) -> None:
        try:
            fd, peer = self.listener.sock._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in SKIPPED_ACCEPT_ERRNOS:
                self._acceptor.accept_failed(self.listener, exc)  # EMFILE: back off, as for all
            return
        if self._scrapes >= MAX_SCRAPES:
            os.close(fd)  # a flood of scrapes must not become a flood of forks
            return
        closes = self._forker.closes()
        try:
            pid = self._forker.fork()
        except OSError as exc:
            os.close(fd)
            self._acceptor.fork_failed(exc, "no metrics answered")
            self._acceptor.back_off()
            return
        if pid == 0:
            family, limits = self.listener.family, self._limits
            become(
                closes, self._forker.signals, limits, family, peer,
                serve, fd, family, peer, self._answer, self._on_error, limits,
            )  # fmt: skip
        os.close(fd)
        self._scrapes += 1
        self._children.watch(pid, self._done)

    def _done(self, status: int) -> None:
        self._scrapes -= 1
        if status != 0:
            logger.warning("a metrics scrape child ended with %s", describe_status(status))
