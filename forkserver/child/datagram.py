"""Serve one datagram (socketserver's ForkingUDPServer): the handler replies with sendto()."""

from __future__ import annotations

import socket
import time

from .stream import served

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .limits import ChildLimits

__all__ = ["answer"]


def answer(
    fd: int,
    data: bytes,
    family: int,
    peer: Any,
    run: Callable[[Any, Any], None],
    on_error: Callable[[Any, Any], None],
    limits: ChildLimits | None = None,
) -> int:
    """Run the handler on one datagram: its request is ``(data, sock)``, and
    it replies with sendto(); returns the exit status.  *fd* is the child's
    own copy of the UDP socket, closed here."""
    sock = socket.socket(family, socket.SOCK_DGRAM, 0, fd)
    if limits is not None and limits.idle_timeout:
        sock.settimeout(limits.idle_timeout)
    started = time.monotonic() if limits is not None and limits.access_log else 0.0
    status = 1
    try:
        run((data, sock), peer)
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        on_error((data, sock), peer)  # the request, as the handler got it (socketserver's)
    finally:
        sock.close()
    if started:
        served(family, peer, time.monotonic() - started, (len(data), None), status)
    return status
