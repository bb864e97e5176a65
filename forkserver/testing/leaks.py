"""What a server can leave behind: unreaped children, processes still running.

A server started by :class:`~forkserver.testing.process.ServerProcess` leads
its own session and process group, and every process it starts inherits
both unless it leaves them.  So once the server has exited (and before it is
reaped, while its pid cannot be reused) a process whose session or group id
is the server's pid is a leftover; so is one of its descendants seen before
the stop that left the session meanwhile.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Sequence

import psutil

__all__ = [
    "LEAK_GRACE",
    "ZOMBIE_GRACE",
    "alive",
    "descendants",
    "describe",
    "group_members",
    "kill_everything",
    "leftovers",
    "status_text",
    "zombies",
]

ZOMBIE_GRACE = 2.0  # a child may exit just as we look: the server has this long to reap it
LEAK_GRACE = 1.0  # a process still running this long after the server exited is a leak
KILL_WAIT = 5.0  # SIGKILL is asynchronous: how long a killed process gets to be gone


def zombies(pid: int, grace: float | None = None) -> list[psutil.Process]:
    """Children of *pid* that stay zombies: exited, and *pid* does not reap
    them within *grace* seconds (default ZOMBIE_GRACE)."""
    grace = ZOMBIE_GRACE if grace is None else grace
    found = [p for p in _children(pid) if _status(p) == psutil.STATUS_ZOMBIE]
    deadline = time.monotonic() + grace
    while found and time.monotonic() < deadline:
        time.sleep(0.02)
        found = [p for p in found if _status(p) == psutil.STATUS_ZOMBIE]
    return found


def leftovers(
    pid: int, seen: Iterable[psutil.Process] = (), grace: float | None = None
) -> list[psutil.Process]:
    """Live processes of *pid*'s session or process group other than *pid*,
    and live ones among *seen* (its descendants before it exited), still there
    after *grace* seconds (default LEAK_GRACE).  Call it once *pid* has exited."""
    grace = LEAK_GRACE if grace is None else grace
    seen = list(seen)
    deadline = time.monotonic() + grace
    while True:
        found = {p.pid: p for p in seen if alive(p)}
        for other in psutil.pids():
            try:
                if other != pid and pid in (os.getpgid(other), os.getsid(other)):
                    process = psutil.Process(other)
                    if alive(process):
                        found[other] = process
            except (OSError, psutil.Error):
                continue  # gone meanwhile
        if not found or time.monotonic() >= deadline:
            return sorted(found.values(), key=lambda p: p.pid)
        time.sleep(0.02)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes in process group *pgid*."""
    found = []
    for other in psutil.pids():
        try:
            if os.getpgid(other) == pgid:
                process = psutil.Process(other)
                if alive(process):
                    found.append(process)
        except (OSError, psutil.Error):
            continue
    return found


def kill_everything(pgid: int, processes: Sequence[psutil.Process] = ()) -> None:
    """SIGKILL process group *pgid* and each of *processes* (some may have left
    the group), and wait until they are gone (zombies count as gone: reaping
    is for their parent, init for orphans)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group (a zombie leader does not count)
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass  # gone already
    deadline = time.monotonic() + KILL_WAIT
    while any(alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.02)


def descendants(pid: int) -> list[psutil.Process]:
    """*pid*'s children, their children and so on, now."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(process: psutil.Process) -> bool:
    """Running: neither gone nor a zombie."""
    status = _status(process)
    return status is not None and status != psutil.STATUS_ZOMBIE


def describe(processes: Sequence[psutil.Process]) -> str:
    """One indented line per process: pid, parent and command line."""
    rows = []
    for process in processes:
        try:
            # A process title (setproctitle) leaves empty arguments behind it.
            command = " ".join(filter(None, process.cmdline())) or f"[{process.name()}]"
            parent = process.ppid()
        except psutil.Error:
            command, parent = "(gone)", 0
        rows.append(f"    pid {process.pid} (parent {parent}): {command}")
    return "\n".join(rows)


def status_text(status: int) -> str:
    """An exit status as Popen reports it, in words: "exit status 2", "signal SIGKILL"."""
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _status(process: psutil.Process) -> str | None:
    try:
        return str(process.status())
    except psutil.NoSuchProcess:
        return None
