"""What each child applies to itself before the handler runs: resource
limits, the user it runs as, and timeouts on its connection."""

from __future__ import annotations

import errno
import os
import select
import socket
import sys

from .tcp_info import silent_for

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..config import Settings
    from .deadlines import Connection

__all__ = ["ChildLimits", "timeout_reason"]


class ChildLimits:
    """What each child applies to itself before the handler runs: resource
    limits, the user it runs as, and timeouts on its connection."""

    def __init__(self, settings: Settings) -> None:
        s = settings
        self.rlimits: list[tuple[int, int, int]] = []  # (kind, soft, hard)
        if any(
            v >= 0 for v in (s.limit_cpu, s.limit_memory_mb, s.limit_open_files, s.limit_core_mb)
        ):
            import resource

            for value, kind in (
                (s.limit_cpu, resource.RLIMIT_CPU),
                (s.limit_memory_mb << 20 if s.limit_memory_mb >= 0 else -1, resource.RLIMIT_AS),
                (s.limit_open_files, resource.RLIMIT_NOFILE),
                (s.limit_core_mb << 20 if s.limit_core_mb >= 0 else -1, resource.RLIMIT_CORE),
            ):
                if value >= 0:
                    self.rlimits.append((kind, value, value))
            if s.limit_cpu >= 0:
                # A hard limit one second above the soft one: the kernel sends
                # SIGXCPU at the soft limit (a death that says why), where a
                # hard limit reached sends SIGKILL, which could be anyone's.
                _, hard = resource.getrlimit(resource.RLIMIT_CPU)
                if hard == resource.RLIM_INFINITY or hard > s.limit_cpu:
                    at = [kind for kind, _, _ in self.rlimits].index(resource.RLIMIT_CPU)
                    self.rlimits[at] = (resource.RLIMIT_CPU, s.limit_cpu, s.limit_cpu + 1)
        self.uid = self.gid = -1
        self.groups: list[int] = []
        if s.user or s.group:
            import grp
            import pwd

            if s.user:
                account = pwd.getpwnam(s.user)
                self.uid, self.gid = account.pw_uid, account.pw_gid
            if s.group:
                self.gid = grp.getgrnam(s.group).gr_gid
            self.groups = [self.gid]
        self.idle_timeout = s.idle_timeout
        # What a timed-out send is put down to: with no send_timeout, the
        # socket timeout (idle_timeout) bounds each sendall() whole.
        self.send_timeout = s.send_timeout or s.idle_timeout
        self.send_deadline = s.send_timeout
        self.request = (s.request_timeout, s.request_min_rate, s.request_timeout_max)
        # Decided once: a child with neither deadline keeps a plain socket.
        self.connection_class: type[socket.socket] = socket.socket
        if s.send_timeout or s.request_timeout:
            from .deadlines import Connection

            self.connection_class = Connection
        self.access_log = s.access_log
        self.any = bool(
            self.rlimits
            or self.gid >= 0
            or self.idle_timeout
            or self.send_timeout
            or s.request_timeout
            or self.access_log
        )

    def apply_to_process(self) -> None:
        """Set the rlimits, then drop privileges for good (raises OSError)."""
        if self.rlimits:
            import resource

            for kind, soft, hard in self.rlimits:
                resource.setrlimit(kind, (soft, hard))
        if self.gid >= 0:
            os.setgroups(self.groups)
            os.setgid(self.gid)
        if self.uid >= 0:
            os.setuid(self.uid)
            if os.geteuid() != self.uid:  # setuid() must not be half-done
                raise PermissionError(f"still running as uid {os.geteuid()}")

    def apply_to_connection(self, conn: socket.socket) -> None:
        # idle_timeout is the socket's own timeout, so that every reader
        # (recv, makefile's buffered files) gets TimeoutError; a kernel
        # SO_RCVTIMEO would make makefile() take the EAGAIN for an end of
        # file.
        if self.idle_timeout:
            conn.settimeout(self.idle_timeout)
        if self.send_deadline:
            # The Python handler's sends are bounded by Connection (a deadline
            # per sendall).  What bypasses the socket object (an exec service,
            # os.write on the fd) gets the kernel's bounds: SO_SNDTIMEO for
            # each send, and on TCP, TCP_USER_TIMEOUT, which drops a client
            # that takes no data for that long (measured on loopback: a write
            # loop to a client that never reads failed with ETIMEDOUT 1.27 s
            # after the start with 1 s).
            whole = int(self.send_deadline)
            micros = int((self.send_deadline - whole) * 1e6)
            timeval = whole.to_bytes(8, sys.byteorder) + micros.to_bytes(8, sys.byteorder)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                millis = max(1, int(self.send_deadline * 1000))
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, millis)
        if self.connection_class is not socket.socket:
            deadlines: Connection = conn  # type: ignore[assignment]
            deadlines.send_timeout = self.send_deadline
            if self.request[0]:
                deadlines.expect_request(*self.request)


def timeout_reason(
    conn: socket.socket, exc: BaseException, limits: ChildLimits | None
) -> str | None:
    """Why the handler's I/O failed, if a timeout of ours or of the handler's
    own (``StreamHandler.timeout``) expired on the client: None for anything else."""
    if not isinstance(exc, BlockingIOError | TimeoutError):
        return None
    why = getattr(conn, "expired", None)  # a Connection's deadline says it itself
    if why is not None:
        return str(why)
    send_timeout = limits.send_timeout if limits is not None else 0.0
    if exc.errno == errno.ETIMEDOUT and send_timeout:
        return f"send_timeout ({send_timeout:g}s) expired: the kernel dropped a client not reading"
    try:
        own = conn.gettimeout()
        # poll, not select: select() refuses descriptors numbered 1024 or more.
        waiting = select.poll()
        waiting.register(conn, select.POLLOUT)
        writable = waiting.poll(0)
    except (OSError, ValueError):
        return None  # closed by the handler: not ours to explain
    if not writable and send_timeout:
        return f"send_timeout ({send_timeout:g}s) expired: the client is not reading"
    if not own or not isinstance(exc, TimeoutError):
        return None
    silent = silent_for(conn)
    if silent is not None and silent < own * 0.9:
        return None  # the client was not idle: some other socket of the handler's timed out
    idle = limits.idle_timeout if limits is not None else 0.0
    name = "idle_timeout" if own == idle else "the handler's timeout"
    return f"{name} ({own:g}s) expired: the client sent nothing"
