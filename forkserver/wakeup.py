"""The self-pipe that wakes the parent's loop, and the signal handlers that use it.

Signal handlers do nothing but note the signal and wake the loop: the C-level
handler writes a byte to the pipe (``signal.set_wakeup_fd``), the Python-level
one adds the signal number to a set.  All real work (reaping, stopping,
logging) happens in the loop, never inside a handler.  Other threads wake the
loop through the same pipe (``Server.shutdown()``).
"""

from __future__ import annotations

import _thread
import os
import signal

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType
    from typing import Any

__all__ = ["HANDLED_SIGNALS", "Wakeup"]

# Signals the parent takes over while serving; children get SIG_DFL back.
HANDLED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGCHLD,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


_NONE: set[int] = set()


class Wakeup:
    """A non-blocking pipe: anything written to it makes the loop's select return."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closing = _thread.allocate_lock()
        self.pending: set[int] = set()
        self.signals_installed = False
        self._saved_handlers: dict[int, Any] = {}
        self._saved_wakeup_fd = -1

    def install_signals(self) -> bool:
        """Take over HANDLED_SIGNALS; False where that is impossible (not the main thread)."""
        try:
            self._saved_wakeup_fd = signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)
        except ValueError:  # only the main thread may handle signals
            return False
        # One handler object for every signal: a child that resets them all
        # then drops references to one object, not seven (each freed object
        # is a page touched, so copied, in every child).
        self._handler = self._note
        for signum in HANDLED_SIGNALS:
            self._saved_handlers[signum] = signal.signal(signum, self._handler)
        # A signal must not turn a blocking call into an error: retry, don't fail.
        for signum in HANDLED_SIGNALS:
            signal.siginterrupt(signum, False)
        # A reload re-executes with these blocked (server.py): deliver what
        # arrived meanwhile, now that there are handlers for it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        self.signals_installed = True
        return True

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.pending.add(signum)

    def take_signals(self) -> set[int]:
        """The signals noted since the last call."""
        if not self.pending:
            return _NONE
        taken, self.pending = self.pending, set()
        return taken

    def wake(self) -> None:
        """Wake the loop; safe from another thread, also while close() runs."""
        with self._closing:
            if self.wfd < 0:
                return
            try:
                os.write(self.wfd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full, so the loop is going to wake anyway

    def drain(self) -> None:
        """Empty the pipe; call when select() reported it readable."""
        try:
            while len(os.read(self.rfd, 65536)) == 65536:
                pass
        except BlockingIOError:
            pass  # it held exactly a multiple of 64 KiB

    def restore_signals(self) -> None:
        if not self.signals_installed:
            return
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._saved_wakeup_fd)
        self._saved_handlers.clear()
        self.signals_installed = False

    def close(self, restore: bool = True) -> None:
        if restore:
            self.restore_signals()
        with self._closing:  # no wake() may write to a closed (or reused) fd number
            for fd in (self.rfd, self.wfd):
                try:
                    os.close(fd)
                except OSError:
                    pass  # already closed
            self.rfd = self.wfd = -1
