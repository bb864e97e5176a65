"""What crosses exec(): one schema for the lean re-exec, a reload and an upgrade.

Three times the parent becomes a new program image and must take state with
it: after the command line has parsed the config and bound the listeners
(the lean re-exec, boot.py), at a reload (same pid, re-executed) and at an
upgrade (a new parent beside the old one).  The state goes in an inheritable
memfd whose fd is named in an environment variable, as :mod:`marshal` data
(built in, so reading it imports nothing; the reader is the same interpreter
binary, so the format matches).  Not the environment itself: one variable
may hold only 128 KiB, and a reload's child table outgrows that with ~1,200
children (E2BIG).

The schema (every key optional but ``listeners``)::

    listeners  [Listener.inherit(), ...]   fds that survive exec, with identity
    children   [(pid, family, peer, age)]  a reload's children, to adopt
    ready_fd   int                         an upgrade: say "ready" on it
    # the lean re-exec only:
    settings   dict                        the validated Settings, as a dict
    source     str                         the config file, for messages
    path       [str]                       sys.path
    argv       [str]                       the command line, for reload and upgrade
    metrics    Listener.inherit() | None   the metrics listener
"""

from __future__ import annotations

import marshal
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from .listeners import Listener

__all__ = [
    "BOOT_ENV",
    "INHERIT_ENV",
    "discard",
    "handover_env",
    "stash",
    "take_handover",
    "unstash",
]

# The command line's re-exec into the lean parent (boot.py).
BOOT_ENV = "FORKSERVER_BOOT"
# A reload (same pid, re-executed) or an upgrade (a new parent) hands over
# its listeners, and for a reload its children, to a parent that starts from
# the command line again: it reads the new config, keeps the listeners whose
# address is unchanged and adopts the children still serving.
INHERIT_ENV = "FORKSERVER_INHERIT"


def stash(state: dict[str, Any]) -> str:
    """Put *state* in an inheritable memfd; returns "fd:N" for the environment."""
    data = marshal.dumps(state)
    fd = os.memfd_create("forkserver-state", 0)  # no MFD_CLOEXEC: it crosses exec
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return f"fd:{fd}"


def unstash(value: str) -> dict[str, Any]:
    """The state behind a stash() value (its memfd is closed)."""
    fd = int(value.removeprefix("fd:"))
    try:
        state: dict[str, Any] = marshal.loads(os.pread(fd, os.fstat(fd).st_size, 0))
    finally:
        os.close(fd)
    return state


def discard(value: str) -> None:
    """Close the memfd behind a stash() value that was not handed over."""
    try:
        os.close(int(value.removeprefix("fd:")))
    except (OSError, ValueError):
        pass  # gone already


def handover_env(
    listeners: Sequence[Listener],
    children: list[tuple[int, int, Any, float]] | None = None,
    ready_fd: int = -1,
) -> str:
    """The INHERIT_ENV value; marks the listeners' fds to survive exec."""
    state = {
        "listeners": [lis.inherit() for lis in listeners],
        "children": children or [],
        "ready_fd": ready_fd,
    }
    return stash(state)


def take_handover() -> dict[str, Any] | None:
    """What a reloading or upgrading parent handed over, if anything."""
    value = os.environ.pop(INHERIT_ENV, None)
    return unstash(value) if value else None
