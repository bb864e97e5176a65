"""The parent's table of live children, and reaping each through its pidfd.

Each child is watched through its own pidfd (``pidfd_open``), registered on
the loop: it becomes readable when that child has exited, and only then does
the parent call ``waitpid(pid, WNOHANG)`` for it, or ``wait4``, which also
hands back what the child used (CPU time, peak RSS: accounting.py), when the
access log or metrics read it (:meth:`ChildTable.keep_usage`).
So reaping is O(exited), never a walk of every child (``waitpid(-1)`` makes
the kernel scan the whole list of children, and a reap takes two such
calls: 139 µs each with 5,000 children alive, measured by bench/scale.py),
no SIGCHLD is needed, and the parent
never reaps a process it did not start: a program that embeds a Server and
runs ``subprocess.run()`` keeps its own children's statuses (CPython fixed the
same in socketserver, issue 1540386).

The parent never blocks in a wait.  Normal exits are silent; non-zero
statuses and deaths by signal are logged with pid, peer, how long the child
lived, and for a signal why in words (accounting.py).

A pidfd is an fd in the parent per live child; where its number goes, and
the open-files limit that makes room for them, are pidfds.py's.  Children
inherit their siblings' pidfds, which are close-on-exec and grant nothing a
pid does not; closing them in each child would cost O(children) per
connection.
"""

from __future__ import annotations

import os
import signal
import time
from select import EPOLLIN

from .. import log
from ..addresses import format_address
from .accounting import Costs, Deaths, describe_status
from .pidfds import LOW, higher

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from resource import struct_rusage
    from typing import Any

    from .loop import Loop, Timer

__all__ = ["Child", "ChildTable"]

logger = log.get_logger(__name__)

RETRY_WATCH = 0.1  # seconds: how often a child with no pidfd (none could be opened) is polled


class Child:
    """One forked child: which connection it serves and since when."""

    # Eight slots, as before accounting: three more moved Child to a larger
    # allocation size class, which cost the default path 5 copy-on-write
    # faults per connection (bench/accounting.py); what accounting keeps
    # per child lives in the ChildTable instead.
    __slots__ = ("family", "lifetime", "peer", "pid", "pidfd", "source", "started", "status")

    def __init__(self, pid: int, family: int, peer: Any, started: float) -> None:
        self.pid = pid
        self.family = family
        self.peer = peer
        self.started = started
        self.pidfd = -1
        self.source: Any = None  # the admission source it counts against, if any
        self.status = 0  # the raw wait status, once reaped
        self.lifetime: Timer | None = None  # its max_lifetime, if one is set

    @property
    def peer_text(self) -> str:
        if self.peer is None:
            return "(a spare, no connection reported)"
        return format_address(self.family, self.peer)


class ChildTable:
    """Children by pid, each reaped by its pidfd's callback.  Only the parent's loop touches it.

    *on_exit* is called with each child reaped.  Processes that are not
    children serving connections (a config check, a new parent, a metrics
    scrape) are :meth:`watch`\\ ed: reaped the same way, but not counted.
    """

    def __init__(self, loop: Loop, on_exit: Callable[[Child], None]) -> None:
        self._loop = loop
        self._register, self._unregister = loop.register, loop.unregister
        self._callbacks = loop.callbacks
        self._reap_pidfd = self._reap  # bound once, not for each child
        self.on_exit = on_exit
        # Run before each reap (the spares' busy records: a spare that served
        # and exited at once is logged with its client, not as a spare).
        self.before_reap: Callable[[], None] | None = None
        self._children: dict[int, Child] = {}
        # The same dict, for the accept path's len(): ChildTable.__len__ is a
        # Python call through a C slot, and its two calls per connection cost
        # the parent 9 page faults of its ~88 (perf, 1 client, echo).
        self.by_pid: Mapping[int, Child] = self._children
        self._by_pidfd: dict[int, Child] = {}
        self._watched: dict[int, tuple[int, Callable[[int], None]]] = {}  # pidfd: (pid, on_exit)
        # Processes no pidfd could be opened for (out of descriptors): polled;
        # pid -> on_exit, or None for a child in the table.
        self._unwatched: dict[int, Callable[[int], None] | None] = {}
        self._poll_timer: Timer | None = None
        self.fd_floor = 0  # pidfds.make_room()'s: move high pidfds there (0: leave them)
        self.exited_ok = 0
        self.exited_error = 0
        self.exited_signal = 0
        self.deaths = Deaths()  # its limit_cpu is set by the parent
        self.costs: Costs | None = None  # with a metrics listener: set (and fed) by the parent
        self._wait_exited = _waitpid_exited
        # What on_exit may read of the child being reaped: its rusage (with
        # keep_usage()), and why it died of a signal, in words, if known.
        self.usage: struct_rusage | None = None
        self.why = ""
        self._sent: dict[int, str] = {}  # pid -> why forkserver signalled it, until reaped

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._children.values()))

    def __contains__(self, pid: int) -> bool:
        return pid in self._children

    def keep_usage(self) -> None:
        """Reap with wait4 from now on: each child's rusage is ``usage`` during on_exit.

        Only when something reads it (the access log, metrics): the rusage
        object wait4 builds cost the parent 12 more copy-on-write faults per
        connection than waitpid (103 against 91, 3 s of one-client echo
        churn, Python 3.11: bench/accounting.py)."""
        # os.wait4 imports resource (for its struct_rusage) at its first call,
        # after reaping: out of descriptors then, the status would be lost.
        import resource  # noqa: F401

        self._wait_exited = _wait4_exited

    def get(self, pid: int) -> Child | None:
        return self._children.get(pid)

    def add(self, pid: int, family: int, peer: Any, started: float) -> Child:
        """A child just forked: watch it until it exits."""
        child = Child(pid, family, peer, started)
        self._children[pid] = child
        try:
            pidfd = os.pidfd_open(pid)  # close-on-exec
        except OSError as exc:
            self._poll(pid, None, exc)
            return child
        if pidfd >= LOW:
            pidfd = higher(pidfd, self.fd_floor)
        child.pidfd = pidfd
        self._by_pidfd[pidfd] = child
        self._register(pidfd, EPOLLIN)  # Loop.add_reader(), inline
        self._callbacks[pidfd] = self._reap_pidfd
        return child

    def watch(self, pid: int, on_exit: Callable[[int], None]) -> None:
        """Reap *pid*, a process that serves no connection, with ``on_exit(status)``."""
        try:
            pidfd = os.pidfd_open(pid)  # close-on-exec
        except OSError as exc:
            self._poll(pid, on_exit, exc)
            return
        if pidfd >= LOW:
            pidfd = higher(pidfd, self.fd_floor)
        self._watched[pidfd] = (pid, on_exit)
        self._loop.add_reader(pidfd, self._reap_watched)

    def watching(self, pid: int) -> bool:
        return any(p == pid for p, _ in self._watched.values()) or pid in self._unwatched

    def _reap(self, pidfd: int) -> None:
        """The pidfd of a child became readable: it has exited."""
        if self.before_reap is not None:
            self.before_reap()
        child = self._by_pidfd.pop(pidfd)
        del self._callbacks[pidfd]  # Loop.remove_reader(), inline
        self._unregister(pidfd)
        os.close(pidfd)
        pid = child.pid
        got, status, usage = self._wait_exited(pid)
        if got:
            self._collect(child, status, usage)
        else:
            self._unwatched[pid] = None
            self._poll_later()

    def _reap_watched(self, pidfd: int) -> None:
        pid, on_exit = self._watched.pop(pidfd)
        self._loop.remove_reader(pidfd)
        os.close(pidfd)
        got, status, _ = _waitpid_exited(pid)
        if got:
            on_exit(status)
        else:
            self._unwatched[pid] = on_exit
            self._poll_later()

    def _collect(self, child: Child, status: int, usage: struct_rusage | None) -> None:
        del self._children[child.pid]
        child.status = status
        self.usage = usage
        if child.lifetime is not None:
            self._loop.cancel(child.lifetime)
            child.lifetime = None
        if status == 0:
            self.exited_ok += 1
            if self._sent:  # signalled by us, yet it exited 0
                self._sent.pop(child.pid, None)
        else:
            if os.WIFSIGNALED(status):
                self.exited_signal += 1
            else:
                self.exited_error += 1
            self.why = why = self.deaths.why(status, self._sent.pop(child.pid, ""))
            logger.warning(
                "child %d for %s %s after %.3fs%s",
                child.pid,
                child.peer_text,
                describe_status(status),
                time.monotonic() - child.started,
                f": {why}" if why else "",
            )
        self.on_exit(child)

    # -- no pidfd: poll (out of descriptors, so rare) -------------------------

    def _poll(self, pid: int, on_exit: Callable[[int], None] | None, exc: OSError) -> None:
        logger.warning(
            "cannot watch child %d through a pidfd (%s): polling it every %gs",
            pid,
            exc.strerror,
            RETRY_WATCH,
        )
        self._unwatched[pid] = on_exit
        self._poll_later()

    def _poll_later(self) -> None:
        if self._poll_timer is None:
            self._poll_timer = self._loop.call_later(RETRY_WATCH, self._poll_unwatched)

    def _poll_unwatched(self) -> None:
        self._poll_timer = None
        for pid, on_exit in list(self._unwatched.items()):
            got, status, usage = (self._wait_exited if on_exit is None else _waitpid_exited)(pid)
            if not got:
                continue
            del self._unwatched[pid]
            if on_exit is None:
                self._collect(self._children[pid], status, usage)
            else:
                on_exit(status)
        if self._unwatched:
            self._poll_later()

    # -- signals and lifetimes -------------------------------------------------

    def signal_all(self, signum: int, why: str = "the server's stop") -> None:
        """Send *signum* to every child; *why* is logged if one dies of it."""
        for child in list(self._children.values()):
            self._sent[child.pid] = why
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass  # exited, not yet reaped

    def limit_lifetime(self, child: Child, max_lifetime: float, kill_timeout: float) -> None:
        """SIGTERM *child* once it has served for *max_lifetime*, SIGKILL
        *kill_timeout* later."""
        self._loop.cancel(child.lifetime)

        def over(overdue: bool = False) -> None:
            child.lifetime = None
            if child.pid not in self._children:
                return
            logger.warning(
                "child %d for %s exceeded max_lifetime (%gs): %s",
                child.pid,
                child.peer_text,
                max_lifetime,
                "SIGKILL" if overdue else "SIGTERM",
            )
            self._sent[child.pid] = f"max_lifetime = {max_lifetime:g}s ran out"
            try:
                os.kill(child.pid, signal.SIGKILL if overdue else signal.SIGTERM)
            except ProcessLookupError:
                return
            if not overdue:
                child.lifetime = self._loop.call_later(kill_timeout, lambda: over(True))

        child.lifetime = self._loop.call_at(child.started + max_lifetime, over)

    def close(self) -> None:
        """Outside the loop: stop watching (the pidfds are closed); the
        children, if any are left, are reaped by wait_all()."""
        for pidfd in [*self._by_pidfd, *self._watched]:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
        self._by_pidfd.clear()
        self._watched.clear()
        self._loop.cancel(self._poll_timer)
        self._poll_timer = None

    def stop_all(self, kill_timeout: float) -> None:
        """Outside the loop (an error, or server_close() without serve_forever):
        TERM, wait up to *kill_timeout*, then KILL, and reap every one."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + kill_timeout
        while self._children and time.monotonic() < deadline:
            if not self._reap_any():
                time.sleep(0.01)
        self.signal_all(signal.SIGKILL)
        for child in list(self._children.values()):
            self._children.pop(child.pid)
            child.status = _wait(child.pid)
        self._sent.clear()

    def collect(self, blocking: bool, at_most: int = 0) -> int:
        """Outside the loop: reap the children that have exited, each through
        its pidfd as the loop would (socketserver's collect_children).
        *blocking* waits until all have exited, or *at_most* of them.  Returns
        how many were reaped."""
        import select

        reaped = 0
        while self._by_pidfd:  # a child with no pidfd is the loop's poll's to reap
            poller = select.poll()
            for pidfd in self._by_pidfd:
                poller.register(pidfd, select.POLLIN)
            for pidfd, _ in poller.poll(None if blocking else 0):
                self._reap(pidfd)
                reaped += 1
            if not blocking or (at_most and reaped >= at_most):
                break
        return reaped

    def _reap_any(self) -> bool:
        reaped = False
        for pid in list(self._children):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 0
            if got:
                child = self._children.pop(pid)
                child.status = status
                reaped = True
        return reaped


def _wait(pid: int) -> int:
    """The raw status of *pid*, waiting for it (outside the loop only)."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:  # SIGCHLD set to SIG_IGN by the host program: auto-reaped
        return 0


def _wait4_exited(pid: int) -> tuple[int, int, struct_rusage | None]:
    """(pid, raw status, rusage) of *pid* if it has exited, else (0, 0, None).

    Called once its pidfd is readable, so it has: WNOHANG only makes sure the
    loop can never block here.  The same system call as waitpid's (both are
    wait4() in the kernel), with the rusage filled in."""
    try:
        return os.wait4(pid, os.WNOHANG)
    except ChildProcessError:  # SIGCHLD set to SIG_IGN by the host program: auto-reaped
        return pid, 0, None


def _waitpid_exited(pid: int) -> tuple[int, int, struct_rusage | None]:
    """As _wait4_exited, without the rusage: the default path."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return pid, 0, None
    return got, status, None
