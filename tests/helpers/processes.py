"""The server's children as the tests see them: live, zombie, idle, reaped."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from forkserver.testing.leaks import group_members
from forkserver.testing.pytest_plugin import ServerProcess

from .servers import wait_until

__all__ = [
    "child_pids",
    "children_gone",
    "frozen",
    "group_members",
    "idle_children",
    "live_children",
    "reaped",
    "zombie_children",
]


def children_gone(server: ServerProcess, timeout: float = 20.0) -> None:
    """Every child reaped: none alive, none a zombie (waits for the reaping)."""
    try:
        wait_until(lambda: not server.children(), timeout, "the server's children to go")
    except AssertionError:
        zombies = [p.pid for p in zombie_children(server)]
        left = [p.pid for p in server.children()]
        raise AssertionError(f"children left: {left}, of which zombies: {zombies}") from None


def zombie_children(server: ServerProcess) -> list[psutil.Process]:
    """The server's children that have exited but were not reaped."""
    found = []
    for child in server.children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def child_pids(pid: int) -> set[int]:
    """The children of *pid* (zombies included), from /proc: cheap enough to
    sample in a loop, unlike psutil's children(), which scans every process."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fp:
            return {int(p) for p in fp.read().split()}
    except (FileNotFoundError, ProcessLookupError):
        return set()


def live_children(server: ServerProcess) -> set[int]:
    """Pids of the server's children that are running (not zombies)."""
    live = set()
    for pid in child_pids(server.pid):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                live.add(pid)
        except psutil.NoSuchProcess:
            continue
    return live


def idle_children(server: ServerProcess, settings: dict[str, Any], timeout: float = 20) -> set[int]:
    """Wait until the server has only its idle children (the spares in pool
    mode, none forked on accept) and return their pids."""
    want = int(settings.get("spare_children", 0))

    def settled() -> bool:  # no zombie either: every exited child was reaped
        return len(child_pids(server.pid)) == want and len(live_children(server)) == want

    wait_until(settled, timeout, f"{want} idle children and nothing else")
    return live_children(server)


def reaped(pid: int) -> bool:
    """Whether *pid* is gone for good: exited and reaped (a zombie still exists)."""
    return not psutil.pid_exists(pid)


@contextmanager
def frozen(server: ServerProcess) -> Iterator[None]:
    """The parent stopped (SIGSTOP) for the block: it accepts, reads and forks nothing."""
    server.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.signal(signal.SIGCONT)
