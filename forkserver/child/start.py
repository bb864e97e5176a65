"""Becoming a child and leaving: written once for every kind of child.

A child first lets go of everything that belongs to the parent (its signal
handlers and wakeup fd, listeners, the epoll fd, other clients'
connections), applies its limits, does its one job, and leaves with
``os._exit(status)``: it must never return into the parent's loop, nor run
the parent's atexit handlers or finalizers (socketserver's ForkingMixIn
does the same).

Exit status: 0 when the handler returned, 1 when it raised (the traceback is
logged with the peer), N for ``sys.exit(N)``.
"""

from __future__ import annotations

import _signal  # the C module behind signal: see detach_from_parent
import os
import sys

from .. import title

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, NoReturn

    from .limits import ChildLimits

__all__ = ["become", "detach_from_parent", "leave", "setup_failed"]


def detach_from_parent(parent_fds: Iterable[int], signals: tuple[int, ...]) -> None:
    """Let go of the parent's state: its signal handlers and its descriptors.

    *signals* are the parent's handled signals, blocked across fork: they get
    SIG_DFL back before they are unblocked, so the parent's handlers never
    run here.  close() only drops this process's reference: the parent's
    listeners and other clients' connections stay open in the parent.
    """
    if signals:
        # _signal, not signal: signal.py's wrappers turn every argument and
        # result into an enum member, and that machinery touches (so copies)
        # ~100 shared pages in each child: half a fork's cost.
        _signal.set_wakeup_fd(-1)
        for signum in signals:
            _signal.signal(signum, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, signals)
    for parent_fd in parent_fds:
        try:
            os.close(parent_fd)
        except OSError:
            pass  # already closed


def leave(status: int) -> NoReturn:
    """End the child: never return into the parent's loop, never run its atexit."""
    # Flush what the handler print()ed: os._exit skips interpreter cleanup.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass  # a closed or broken stream: nothing more can be said
    os._exit(status)


def become(
    parent_fds: Iterable[int],
    signals: tuple[int, ...],
    limits: ChildLimits | None,
    family: int,
    peer: Any,
    work: Callable[..., int],
    *args: Any,
) -> NoReturn:
    """The whole life of a child: close *parent_fds*, apply *limits*, ``work(*args)``
    (which returns the exit status), leave.  Never returns.  *family* and
    *peer* name the client in a log line if the child cannot get ready."""
    status = 1
    try:
        detach_from_parent(parent_fds, signals)  # before any user code runs
        if title.set_title is not None:  # decided once, in the parent (title.enable)
            title.set_title(title.child(family, peer))
        if limits is not None:
            limits.apply_to_process()  # an OSError here means: never run the handler
        status = work(*args)
    except Exception:
        setup_failed(family, peer)
    finally:
        leave(status)


def setup_failed(family: int, peer: Any) -> None:
    """The child could not get ready (drop privileges, set limits): say why."""
    from .. import log
    from ..addresses import format_address

    log.get_logger(__name__).exception(
        "child for %s could not start its handler", format_address(family, peer)
    )
