"""fork() with the parent's signals blocked, and the fds a new child closes.

Each part of the parent registers a *source*, a callable that yields the
fds it holds now (listeners, the epoll fd, other clients' connections...),
and tells the forker when that set changed.  Between changes the list is
kept as one tuple, computed in the parent: a child forked on the default
path walks a tuple of ints instead of the parent's objects (walking the
sources in each child cost 64 copy-on-write faults, ~160 µs of CPU per
connection, measured).

The list must never be stale: a closed fd's number is reused by the next
accept(), and closing it by its old name would cut a client off.  So every
change calls :meth:`Forker.changed` before the next fork, and with
``FORKSERVER_CHECK_FDS=1`` in the environment (the test suite sets it) each
fork recomputes the list and fails loudly if the kept one differs.

``fork()`` raises OSError (EAGAIN, ENOMEM); the caller decides what a
failure means (refuse the connection, retry the spare later).
"""

from __future__ import annotations

import _signal  # enum-free signal calls on the per-connection path (see child/start.py)
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["Forker"]

CHECK_ENV = "FORKSERVER_CHECK_FDS"


class Forker:
    """Forks children and knows what they must close."""

    def __init__(self) -> None:
        # The parent's handled signals while they are installed (main
        # thread), blocked across fork so the child cannot run the parent's
        # handlers before it has put back the default dispositions.
        self.signals: tuple[int, ...] = ()
        self._private: list[Callable[[], Iterable[int]]] = []
        self._shared: list[Callable[[], Iterable[int]]] = []
        self._closes: tuple[int, ...] | None = None
        self._spare_closes: tuple[int, ...] | None = None
        self._check = bool(os.environ.get(CHECK_ENV))

    def parent_only(self, source: Callable[[], Iterable[int]]) -> None:
        """Fds no child keeps: listeners, the loop's, other clients' connections."""
        self._private.append(source)
        self.changed()

    def shared_with_spares(self, source: Callable[[], Iterable[int]]) -> None:
        """Fds a spare keeps until it has its connection (the handoff socket,
        the busy pipe); a child forked on accept closes them."""
        self._shared.append(source)
        self.changed()

    def changed(self) -> None:
        """Some source holds other fds now: recompute before the next fork."""
        self._closes = self._spare_closes = None

    def closes(self) -> tuple[int, ...]:
        """In the parent, before fork: every fd a child forked on accept (or
        a scrape child) must close."""
        if self._closes is None or self._check:
            live = tuple(fd for source in (*self._private, *self._shared) for fd in source())
            self._verify(self._closes, live)
            self._closes = live
        return self._closes

    def spare_closes(self, keeps: Callable[[], set[int]]) -> tuple[int, ...]:
        """In the parent, before forking a spare: the parent-only fds except
        those ``keeps()`` returns (the listeners it accepts from), asked only
        when the list is computed again."""
        if self._spare_closes is None or self._check:
            keep = keeps()
            live = tuple(fd for source in self._private for fd in source() if fd not in keep)
            self._verify(self._spare_closes, live)
            self._spare_closes = live
        return self._spare_closes

    @staticmethod
    def _verify(kept: tuple[int, ...] | None, live: tuple[int, ...]) -> None:
        if kept is not None and kept != live:
            raise AssertionError(f"stale list of fds to close: kept {kept}, live {live}")

    def fork(self) -> int:
        """os.fork() with the handled signals blocked across it (the child
        unblocks them itself, after resetting them).  Raises OSError."""
        blocked = self.signals
        if not blocked:
            return os.fork()
        _signal.pthread_sigmask(_signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
        except OSError:
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, blocked)
            raise
        if pid:
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, blocked)
        return pid
