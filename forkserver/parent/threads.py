"""Serving from a multi-threaded process: said once, when serving starts.

``fork()`` copies only the thread that calls it.  A lock another thread
holds at that moment stays held in the child for good, unless an at-fork
handler resets it: CPython resets its import lock, :mod:`logging` its
module lock and every handler's; a C library's lock, a lock of the
program's own, or the lock of a module another thread is still importing
(the child cannot import that one module) is not reset.  From Python 3.12
every ``os.fork()`` in such a process also raises a ``DeprecationWarning``
("This process (pid=N) is multi-threaded, use of fork() may lead to
deadlocks in the child."), shown once per fork wherever warnings are shown
in full (``-W always``, or pytest's per-test reset).

So :func:`check` runs once per ``serve()``, never per connection: in a
process with other threads it logs one line naming the hazard, and turns off
that warning for forkserver's own forks (those of ``fork.py``); the
program's other forks still warn.  Threads started after serving began are
not seen.
"""

from __future__ import annotations

import _thread  # not threading: see log.py
import os
import sys

from .. import log
from . import fork

__all__ = ["check", "thread_count"]

logger = log.get_logger(__name__)

# What os.fork() warns from Python 3.12 on, as a warnings filter's regex.
FORK_WARNING = r"This process \(pid=\d+\) is multi-threaded, use of fork\(\)"


def thread_count() -> int:
    """The process's threads, C libraries' included (as the warning counts them)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no /proc: the threads Python started, and the main one
        return _thread._count() + 1


def check() -> None:
    """Log the hazard once, and silence the fork warning, if other threads run."""
    threads = thread_count()
    if threads <= 1:
        return
    silenced = sys.version_info >= (3, 12)
    logger.warning(
        "%d threads in this process: each child is forked with the serving thread only, "
        "and a lock another thread holds at that moment stays held in the child (Python "
        "resets its import lock and logging's; not a C library's, the program's own, or "
        "that of a module another thread is importing)%s",
        threads,
        "; fork()'s DeprecationWarning about it is off for forkserver's forks" if silenced else "",
    )
    if silenced:
        import re
        import warnings

        warnings.filterwarnings(
            "ignore", FORK_WARNING, DeprecationWarning, re.escape(fork.__name__) + r"\Z"
        )
