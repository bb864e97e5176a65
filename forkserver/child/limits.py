"""What each child applies to itself before the handler runs: resource
limits, the user it runs as, and timeouts on its connection."""

from __future__ import annotations

import os
import socket
import sys

from .tcp_info import silent_for

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["ChildLimits"]


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
        self.send_timeout = s.send_timeout or s.idle_timeout
        self.access_log = s.access_log
        self.any = bool(
            self.rlimits
            or self.gid >= 0
            or self.idle_timeout
            or self.send_timeout
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
        # file. With no idle_timeout, send_timeout is SO_SNDTIMEO: a send that
        # cannot progress raises BlockingIOError.
        if self.idle_timeout:
            conn.settimeout(self.idle_timeout)
        elif self.send_timeout:
            whole = int(self.send_timeout)
            micros = int((self.send_timeout - whole) * 1e6)
            timeval = whole.to_bytes(8, sys.byteorder) + micros.to_bytes(8, sys.byteorder)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def timed_out(self, conn: socket.socket, exc: BaseException) -> str | None:
        """Why the handler's I/O failed, if it was one of our timeouts."""
        if not (self.idle_timeout or self.send_timeout):
            return None
        if not isinstance(exc, BlockingIOError | TimeoutError):
            return None
        import select

        # poll, not select: select() refuses descriptors numbered 1024 or more.
        waiting = select.poll()
        waiting.register(conn, select.POLLOUT)
        writable = waiting.poll(0)
        if not writable and self.send_timeout:
            return f"send_timeout ({self.send_timeout:g}s) expired: the client is not reading"
        if not self.idle_timeout:
            return None
        silent = silent_for(conn)
        if silent is not None and silent < self.idle_timeout * 0.9:
            return None  # the client was not idle: some other socket of the handler's timed out
        return f"idle_timeout ({self.idle_timeout:g}s) expired: the client sent nothing"
