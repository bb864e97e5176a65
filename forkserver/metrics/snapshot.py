"""What a scrape child reads: the parent's state, from its copy of the parent's memory.

A scrape child is forked from the serving parent, so it holds a copy-on-write
image of the parent's counters and child table as they were at fork time.
:func:`snapshot` turns them into plain data; :func:`process_stats` and
:func:`parent_stats` ask the kernel, through psutil, about the live children
and the parent.  psutil is imported only here, only in the scrape child.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Protocol, TypedDict

    class ChildView(Protocol):
        """What a snapshot reads from a :class:`forkserver.parent.children.Child`."""

        @property
        def pid(self) -> int: ...
        @property
        def peer(self) -> object: ...
        @property
        def started(self) -> float: ...  # time.monotonic() when it began serving
        @property
        def peer_text(self) -> str: ...

    class ChildTableView(Protocol):
        """What a snapshot reads from a :class:`forkserver.parent.children.ChildTable`."""

        def __iter__(self) -> Iterator[ChildView]: ...
        @property
        def exited_ok(self) -> int: ...
        @property
        def exited_error(self) -> int: ...
        @property
        def exited_signal(self) -> int: ...
        @property
        def costs(self) -> CostsView | None: ...

    class HistogramView(Protocol):
        """What a snapshot reads from a :class:`forkserver.parent.accounting.Histogram`."""

        @property
        def bounds(self) -> tuple[float, ...]: ...
        @property
        def counts(self) -> list[int]: ...
        @property
        def sum(self) -> float: ...

    class CostsView(Protocol):
        """What a snapshot reads from :class:`forkserver.parent.accounting.Costs`."""

        @property
        def cpu(self) -> HistogramView: ...
        @property
        def max_rss(self) -> HistogramView: ...
        @property
        def duration(self) -> HistogramView: ...

    class SettingsView(Protocol):
        @property
        def max_children(self) -> int: ...
        @property
        def spare_children(self) -> int: ...

    class ServerView(Protocol):
        """What a snapshot reads from a :class:`forkserver.server.Server`."""

        @property
        def accepted(self) -> int: ...
        @property
        def fork_failures(self) -> int: ...
        @property
        def refused(self) -> dict[str, int]: ...
        @property
        def children(self) -> ChildTableView: ...
        @property
        def _idle(self) -> set[int]: ...
        @property
        def settings(self) -> SettingsView: ...
        @property
        def stopping(self) -> bool: ...  # a stop or an upgrade's drain has begun

    class ChildInfo(TypedDict):
        pid: int
        peer: str  # "" for a spare that has no connection yet
        age: float  # seconds since it started serving (a spare: since fork)
        state: str  # "busy" or "idle"

    class Snapshot(TypedDict):
        pid: int  # the parent's
        stopping: bool  # draining: /healthz answers 503
        max_children: int
        spare_children: int
        accepted: int
        fork_failures: int
        refused: dict[str, int]  # reason -> count
        exited: dict[str, int]  # "ok", "error", "signal" -> count
        children: list[ChildInfo]
        # What reaped connections cost: name -> (upper bounds, count per
        # bucket, the last one +Inf, not cumulative; sum).  Empty if not kept.
        costs: dict[str, tuple[list[float], list[int], float]]

    # (rss, uss, cpu seconds); uss is None where smaps cannot be read.
    ProcStats = tuple[int, int | None, float]


__all__ = ["parent_stats", "process_stats", "snapshot"]


def snapshot(server: ServerView, parent_pid: int | None = None) -> Snapshot:
    """The server's counters, child table and whether it is stopping, as plain data.

    In the scrape child, pass ``parent_pid=os.getppid()`` (or the pid read
    before fork); it defaults to the calling process, for a caller that is
    the parent itself.
    """
    now = time.monotonic()
    idle = server._idle
    children: list[ChildInfo] = [
        {
            "pid": child.pid,
            "peer": "" if child.peer is None else child.peer_text,
            "age": max(0.0, now - child.started),
            "state": "idle" if child.pid in idle else "busy",
        }
        for child in server.children
    ]
    table = server.children
    costs = table.costs
    histograms = (
        {}
        if costs is None
        else {
            name: (list(h.bounds), list(h.counts), h.sum)
            for name, h in (
                ("cpu", costs.cpu),
                ("max_rss", costs.max_rss),
                ("duration", costs.duration),
            )
        }
    )
    return {
        "pid": os.getpid() if parent_pid is None else parent_pid,
        "stopping": server.stopping,
        "max_children": server.settings.max_children,
        "spare_children": server.settings.spare_children,
        "accepted": server.accepted,
        "fork_failures": server.fork_failures,
        "refused": dict(server.refused),
        "exited": {
            "ok": table.exited_ok,
            "error": table.exited_error,
            "signal": table.exited_signal,
        },
        "children": children,
        "costs": histograms,
    }


def process_stats(pids: Iterable[int], parent_pid: int | None) -> dict[int, ProcStats | None]:
    """psutil's view of each live child: pid -> (rss, uss, cpu seconds).

    A child that is gone (exited, a zombie, or its pid now belongs to a
    process whose parent is not *parent_pid*) is left out; one that is alive
    but unreadable maps to None.  USS needs /proc/PID/smaps, which a child
    that dropped privileges may deny: its uss is then None.
    """
    import psutil

    stats: dict[int, ProcStats | None] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if parent_pid is not None and proc.ppid() != parent_pid:
                    continue  # exited, and its pid was reused
                times = proc.cpu_times()
                try:
                    full = proc.memory_full_info()
                    rss, uss = full.rss, full.uss
                except psutil.AccessDenied:
                    rss, uss = proc.memory_info().rss, None
        except psutil.NoSuchProcess:  # ZombieProcess included
            continue
        except psutil.AccessDenied:
            stats[pid] = None
            continue
        stats[pid] = (rss, uss, times.user + times.system)
    return stats


def parent_stats(pid: int) -> tuple[int, float] | None:
    """The parent's (rss, start time as a Unix timestamp), if it is readable."""
    import psutil

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return proc.memory_info().rss, proc.create_time()
    except psutil.Error:
        return None
