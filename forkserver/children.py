"""The parent's table of live children, and reaping them.

The parent never blocks in waitpid.  Normal exits are silent; non-zero
statuses and deaths by signal are logged with pid, peer and how long the
child lived.

Reaping is O(exited).  ``waitpid(-1, WNOHANG)`` is not: the kernel walks the
whole list of the parent's children for each call, and a reap takes two (the
one that finds the zombie, the one that finds no more), measured 139 µs each
with 5,000 children alive (bench/scale.py).  So a child about to exit writes
its pid to the *exit-notes* pipe (child.py), and on SIGCHLD the parent reaps
those pids with ``waitpid(pid, WNOHANG)``, which the kernel answers by pid
lookup.  A child that dies without a note (killed by a signal, an exec'd
program) leaves a SIGCHLD no note explains, and that triggers the walk at
once.  SIGCHLDs merge, though (one pending signal for several exits), so a
noted exit can hide one without a note: the server walks anyway within
``WALK_DELAY`` of any reap by pid (one walk per interval, however many
children exit), and at once at max_children, where a zombie holds a slot.
"""

from __future__ import annotations

import os
import signal
import time

from . import log
from .listeners import format_address

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any

__all__ = ["Child", "ChildTable", "describe_status"]

logger = log.get_logger(__name__)

WALK_DELAY = 0.1  # seconds: the longest a zombie without a note may wait


class Child:
    """One forked child: which connection it serves and since when."""

    __slots__ = ("family", "peer", "pid", "pidfd", "source", "started", "status")

    def __init__(self, pid: int, family: int, peer: Any, started: float) -> None:
        self.pid = pid
        self.family = family
        self.peer = peer
        self.started = started
        self.pidfd = -1
        self.source: Any = None  # the admission source it counts against, if any
        self.status = 0  # the raw waitpid status, once reaped

    @property
    def peer_text(self) -> str:
        if self.peer is None:
            return "(a spare, no connection reported)"
        return format_address(self.family, self.peer)


def describe_status(status: int) -> str:
    """'exit status 3' or 'killed by SIGKILL' for a raw waitpid status."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    core = " (core dumped)" if os.WCOREDUMP(status) else ""
    return f"killed by {name}{core}"


class ChildTable:
    """Children by pid.  Only the parent's loop touches it."""

    def __init__(self) -> None:
        self._children: dict[int, Child] = {}
        # Processes the parent started that are not children serving
        # connections (a config check, a new parent): pid -> called with status.
        self._watched: dict[int, Callable[[int], None]] = {}
        # Pids that noted their exit but were not zombies yet when last tried.
        self._noted: set[int] = set()
        self.exited_ok = 0
        self.exited_error = 0
        self.exited_signal = 0

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._children.values()))

    def __contains__(self, pid: int) -> bool:
        return pid in self._children

    def watch(self, pid: int, on_exit: Callable[[int], None]) -> None:
        self._watched[pid] = on_exit

    def add(self, child: Child) -> None:
        self._children[child.pid] = child

    def get(self, pid: int) -> Child | None:
        return self._children.get(pid)

    def pidfds(self) -> list[int]:
        return [c.pidfd for c in self._children.values() if c.pidfd >= 0]

    def reap(self) -> list[Child]:
        """Collect every child that has exited (the walk); never blocks."""
        gone: list[Child] = []
        # Stop when the table is empty rather than on ECHILD: no exception in
        # the common case of the last child exiting.
        while self._children or self._watched:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # someone else reaped ours (SIGCHLD ignored?)
                break
            if pid == 0:
                break
            child = self.exited(pid, status)
            if child is not None:
                gone.append(child)
        return gone

    def reap_noted(self, pids: Iterable[int], limit: int) -> tuple[list[Child], bool]:
        """Reap the children whose pids are in exit notes (and the watched
        processes) by pid, and walk all children if no note explains the
        SIGCHLD or *limit* (max_children) is reached.  Returns the children
        gone and whether it walked: if not, the caller walks (reap()) within
        WALK_DELAY."""
        # Only ours: a Server in another thread shares the notes' fd (children
        # inherit it) but reaps its own children by pidfd.
        self._noted.update(pid for pid in pids if pid in self._children or pid in self._watched)
        gone: list[Child] = []
        for pid in [*self._noted, *self._watched]:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours, or reaped already
                self._noted.discard(pid)
                continue
            if got:
                child = self.exited(pid, status)
                if child is not None:
                    gone.append(child)
        if not gone or len(self._children) >= limit:
            return gone + self.reap(), True
        return gone, False

    def reap_pid(self, pid: int) -> Child | None:
        """Collect one known child or watched process, if it has exited (pidfd mode)."""
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped already, by someone else
            if pid in self._watched:
                self._watched.pop(pid)(0)
            return self._children.pop(pid, None)
        return self.exited(pid, status) if got else None

    def watching(self, pid: int) -> bool:
        return pid in self._watched

    def exited(self, pid: int, status: int) -> Child | None:
        """Record that *pid* ended with raw *status*; log it if abnormal."""
        self._noted.discard(pid)  # its pid may be reused for a new child
        child = self._children.pop(pid, None)
        if child is not None:
            child.status = status
        if child is None and pid in self._watched:
            self._watched.pop(pid)(status)
            return None
        if child is None:
            # Another library's child: waitpid(-1) has taken its status, which
            # is all we can do for it; say so rather than lose it silently.
            logger.debug(
                "reaped pid %d that forkserver did not start (%s)", pid, describe_status(status)
            )
            return None
        if status == 0:
            self.exited_ok += 1
            return child
        if os.WIFSIGNALED(status):
            self.exited_signal += 1
        else:
            self.exited_error += 1
        logger.warning(
            "child %d for %s %s after %.3fs",
            pid,
            child.peer_text,
            describe_status(status),
            time.monotonic() - child.started,
        )
        return child

    def signal_all(self, signum: int) -> None:
        for pid in list(self._children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # exited, not yet reaped
