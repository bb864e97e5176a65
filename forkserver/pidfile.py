"""The pidfile: written when the parent is ready, removed when it exits.

Written atomically (a temporary file renamed into place), so a reader never
sees a partial pid, and removed only while it still names this process, so a
successor's pidfile survives its predecessor's exit.
"""

from __future__ import annotations

import os

__all__ = ["remove", "running", "write"]


def running(path: str) -> int | None:
    """The pid a pidfile names, if that process is alive (and not us)."""
    try:
        with open(path) as fp:
            pid = int(fp.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # stale: left by a process that died without cleaning up
    except PermissionError:
        pass  # alive, but someone else's
    return pid


def write(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fp:
        fp.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove(path: str) -> None:
    try:
        with open(path) as fp:
            if int(fp.read().strip() or 0) != os.getpid():
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass  # gone already, or not ours
