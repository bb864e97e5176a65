"""Signals: the one table of what the parent does on each, and the pipe they wake it by.

The handler of every signal does nothing: the interpreter's C-level handler
writes the signal's number to the wakeup pipe (``signal.set_wakeup_fd``),
the loop reads the numbers back and runs the action this table names, in
the loop, never inside a handler.  Other threads wake the loop through the
same pipe (``Server.shutdown()``) with a zero byte.

The handled signals are blocked across fork (fork.py); a child puts back the
default dispositions and turns the wakeup fd off before it unblocks them
(child/start.py), so the parent's actions never run in a child.

SIGCHLD is not handled: each child is reaped through its own pidfd
(``children.py``), so a child's exit costs no signal, and the parent never
reaps a process it did not start.
"""

from __future__ import annotations

import _thread
import os
import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import FrameType
    from typing import Any

__all__ = ["HANDLED_SIGNALS", "SIGNALS", "SignalPipe"]

# signal -> the parent's action (a method of Server named "handle_" + action).
SIGNALS: dict[signal.Signals, str] = {
    signal.SIGTERM: "term",  # graceful stop; a second one stops now
    signal.SIGINT: "int",  # as SIGTERM (Ctrl-C)
    signal.SIGQUIT: "quit",  # stop now: children get SIGKILL
    signal.SIGHUP: "hup",  # reload: check the config, re-execute in place
    signal.SIGUSR1: "usr1",  # reopen log_file (after logrotate)
    signal.SIGUSR2: "usr2",  # upgrade: a new parent on the same listeners
}
HANDLED_SIGNALS: tuple[int, ...] = tuple(int(s) for s in SIGNALS)
WAKE = 0  # the byte another thread writes: "look at your flags"


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the C-level one already wrote to the pipe.
    It must stay empty: in a storm of signals, handlers nest at every call a
    handler makes (measured: a handler that called os.write and os.getpid
    died of RecursionError under 100,000 signals a second)."""


class SignalPipe:
    """A non-blocking pipe: a signal or wake() makes the loop's poll return."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closing = _thread.allocate_lock()
        self.installed = False
        self._saved: dict[int, Any] = {}
        self._saved_wakeup_fd = -1

    def install(self) -> bool:
        """Take over SIGNALS; False where that is impossible (not the main thread)."""
        try:
            self._saved_wakeup_fd = signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)
        except ValueError:  # only the main thread may handle signals
            return False
        for signum in HANDLED_SIGNALS:
            self._saved[signum] = signal.signal(signum, _ignore)
            # A signal must not turn a blocking call into an error: retry, don't fail.
            signal.siginterrupt(signum, False)
        # A reload re-executes with these blocked (reload.py): deliver what
        # arrived meanwhile, now that there are handlers for it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        self.installed = True
        return True

    def dispatch(
        self, actions: Mapping[int, Callable[[], None]], on_wake: Callable[[], None]
    ) -> None:
        """Read what arrived and run each signal's action once (signals merge
        anyway), then *on_wake* (another thread may have set a flag)."""
        taken = bytearray()
        try:
            while chunk := os.read(self.rfd, 4096):
                taken += chunk
                if len(chunk) < 4096:
                    break
        except BlockingIOError:
            pass
        for signum in dict.fromkeys(taken):  # in order of arrival, each once
            # set_wakeup_fd writes every signal with a Python handler, also
            # one the handler's module installed itself (SIGWINCH, SIGRTMIN...):
            # its own handler has run; it is not ours to act on.
            action = actions.get(signum)
            if action is not None:
                action()
        on_wake()

    def wake(self) -> None:
        """Wake the loop; safe from another thread, also while close() runs."""
        with self._closing:
            if self.wfd < 0:
                return
            try:
                os.write(self.wfd, bytes((WAKE,)))
            except BlockingIOError:
                pass  # the pipe is full, so the loop is going to wake anyway

    def restore(self) -> None:
        if not self.installed:
            return
        for signum, handler in self._saved.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._saved_wakeup_fd)
        self._saved.clear()
        self.installed = False

    def close(self, restore: bool = True) -> None:
        if restore:
            self.restore()
        with self._closing:  # no wake() may write to a closed (or reused) fd number
            for fd in (self.rfd, self.wfd):
                try:
                    os.close(fd)
                except OSError:
                    pass  # already closed
            self.rfd = self.wfd = -1
