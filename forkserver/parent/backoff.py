"""Backing off: out of descriptors or processes, stop for a moment instead of spinning.

accept() failing with EMFILE, or fork() with EAGAIN, fails again at once:
retrying in a loop would burn a core and log without end.  So the listeners
leave the loop for BACKOFF_SECONDS, or until a child exits (which frees a
descriptor, or a process), whichever comes first.  The metrics listener
follows (``on_change``): a scrape forks too.
"""

from __future__ import annotations

from ..listeners import BACKOFF_SECONDS, SKIPPED_ACCEPT_ERRNOS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from .loop import Loop, Timer
    from .refusals import Refusals

__all__ = ["Backoff"]


class Backoff:
    """The pause after a resource ran out: *pause* now, *over* when it ends."""

    def __init__(
        self, loop: Loop, refusals: Refusals, pause: Callable[[], None], over: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._refusals = refusals  # logs the failed accept
        self._pause = pause
        self._over = over
        self._timer: Timer | None = None
        # Called with True when a back-off starts, False when it ends early or on time.
        self.on_change: Callable[[bool], None] | None = None

    @property
    def active(self) -> bool:
        return self._timer is not None

    def accept_failed(self, name: str, exc: OSError) -> None:
        """accept() on listener *name* failed: skip that connection, or back off."""
        if exc.errno in SKIPPED_ACCEPT_ERRNOS:
            return  # that one connection failed; the next is fine
        # Out of descriptors (or some error we do not know): retrying at once
        # would spin at 100% CPU.  Leave the connections in the kernel backlog
        # and try again shortly, or as soon as a child exits.
        self._refusals.accept_failed(name, exc, BACKOFF_SECONDS)
        self.start()

    def start(self) -> None:
        """Pause for BACKOFF_SECONDS (again from now, if already paused)."""
        self._pause()
        self._loop.cancel(self._timer)
        self._timer = self._loop.call_later(BACKOFF_SECONDS, self._ended)
        if self.on_change is not None:
            self.on_change(True)

    def end_early(self) -> None:
        """A child exited, freeing what ran out: the caller tries again now."""
        if self._timer is not None:
            self._loop.cancel(self._timer)
            self._timer = None
            if self.on_change is not None:
                self.on_change(False)

    def cancel(self) -> None:
        """The loop is over: no timer left behind."""
        self._loop.cancel(self._timer)
        self._timer = None

    def _ended(self) -> None:
        self._timer = None
        if self.on_change is not None:
            self.on_change(False)
        self._over()
