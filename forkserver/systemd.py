"""systemd integration: socket activation and readiness notification.

Socket activation (``sd_listen_fds``): systemd binds the sockets of a
``.socket`` unit and starts the service with them open from fd 3 on, with
``LISTEN_FDS`` (how many), ``LISTEN_PID`` (which process they are for: any
other process must ignore them) and ``LISTEN_FDNAMES`` (their names, colon
separated).  forkserver then serves on those instead of binding its own.

Readiness (``sd_notify``): with ``Type=notify``, systemd waits for
``READY=1`` on the datagram socket named by ``NOTIFY_SOCKET``; forkserver
also sends ``MAINPID`` (after a re-exec or an upgrade the main pid is the one
that says so), ``STOPPING=1`` and ``RELOADING=1``.  Without ``NOTIFY_SOCKET``
every notification is a no-op.
"""

from __future__ import annotations

import os
import socket

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "notify"]

SD_LISTEN_FDS_START = 3


def listen_fds() -> list[tuple[int, str]]:
    """The sockets systemd passed to this process, as (fd, name); [] if none.

    The LISTEN_* variables are removed, so that children (and anything they
    exec) do not take the sockets for their own."""
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else []
    result = []
    for i, fd in enumerate(fds):
        os.set_inheritable(fd, False)  # systemd passes them without FD_CLOEXEC
        result.append((fd, labels[i] if i < len(labels) else "unknown"))
    return result


def notify(state: str) -> bool:
    """Send *state* (e.g. "READY=1") to systemd; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False  # systemd went away; nothing waits for the answer
    return True
