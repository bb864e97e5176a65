"""What runs inside a child, from the moment fork() returns 0 until os._exit().

The child serves exactly one connection.  It first lets go of everything
that belongs to the parent (listeners, the selector, the wakeup pipe, the
parent's signal handlers), then runs the handler, closes the connection so the
peer sees EOF, and leaves with ``os._exit(status)``: it must never return into
the parent's accept loop, nor run the parent's atexit handlers or finalizers.

Exit status: 0 when the handler returned, 1 when it raised (the traceback is
logged with the peer), N for ``sys.exit(N)``.
"""

from __future__ import annotations

import _signal  # the C module behind signal: see the note in serve_connection
import os
import socket
import sys
import time

from .listeners import format_address

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, NoReturn

    from .config import Settings
    from .service import Service

__all__ = [
    "ChildLimits",
    "answer",
    "detach_from_parent",
    "leave",
    "serve",
    "serve_connection",
    "serve_datagram",
    "set_exit_notes",
]


def _close_connection(conn: socket.socket) -> None:
    # shutdown(SHUT_WR) sends FIN even if some other process still holds a
    # duplicate of the fd (say, a grandchild the handler spawned), so the peer
    # sees EOF now rather than when the last copy goes away.
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # already reset or shut down by the peer or the handler
    conn.close()


class ChildLimits:
    """What each child applies to itself before the handler runs: resource
    limits, the user it runs as, and timeouts on its connection."""

    def __init__(self, settings: Settings) -> None:
        s = settings
        self.rlimits: list[tuple[int, int]] = []
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
                    self.rlimits.append((kind, value))
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

            for kind, value in self.rlimits:
                resource.setrlimit(kind, (value, value))
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

        _, writable, _ = select.select([], [conn], [], 0)
        if not writable and self.send_timeout:
            return f"send_timeout ({self.send_timeout:g}s) expired: the client is not reading"
        if not self.idle_timeout:
            return None
        silent = _silent_for(conn)
        if silent is not None and silent < self.idle_timeout * 0.9:
            return None  # the client was not idle: some other socket of the handler's timed out
        return f"idle_timeout ({self.idle_timeout:g}s) expired: the client sent nothing"


def detach_from_parent(parent_fds: Iterable[int], signals: tuple[int, ...]) -> None:
    """Let go of the parent's state: its signal handlers and its descriptors.

    *signals* are the parent's handled signals, blocked across fork: they get
    SIG_DFL back before they are unblocked, so the parent's handlers never
    run here.
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


def serve(
    fd: int,
    family: int,
    peer: Any,
    run: Callable[[socket.socket, Any], None],
    on_error: Callable[[socket.socket, Any], None],
    limits: ChildLimits | None = None,
    service: Service | None = None,
) -> int:
    """Run the handler on connection *fd*, close it; returns the exit status.

    *family* is the client's: with the PROXY protocol it need not be the
    socket's (an IPv4 client through a proxy on a Unix socket)."""
    if service is None:
        conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    else:
        conn = socket.socket(fileno=fd)
    started = time.monotonic() if limits is not None and limits.access_log else 0.0
    status = 1
    try:
        if limits is not None:
            limits.apply_to_connection(conn)
        if service is not None and service.tls is not None:
            conn, shaken = service.handshake(conn, family, peer)
            if not shaken:  # logged: the client did not complete a TLS handshake
                status = 0
                return status
        run(conn, peer)
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except (ConnectionResetError, BrokenPipeError) as exc:
        # The client went away mid-conversation: routine for a server, not a
        # handler bug, so one line, not a traceback.
        from . import log

        log.get_logger(__name__).info(
            "%s: the client closed the connection (%s)", format_address(family, peer), exc.strerror
        )
        status = 0
    except BaseException as exc:
        why = limits.timed_out(conn, exc) if limits is not None else None
        if why is None:
            on_error(conn, peer)
        else:
            from . import log

            log.get_logger(__name__).info(
                "closing the connection from %s: %s", format_address(family, peer), why
            )
            status = 0
    finally:
        counts = _byte_counts(conn) if started else None
        if service is not None and service.tls is not None:
            service.close_tls(conn)
        _close_connection(conn)
        if started:
            _access_line(family, peer, time.monotonic() - started, counts, status)
    return status


def _tcp_info(conn: socket.socket) -> bytes:
    """The connection's struct tcp_info; b"" for a Unix socket or on error."""
    if conn.family not in (socket.AF_INET, socket.AF_INET6):
        return b""
    try:
        return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return b""


def _silent_for(conn: socket.socket) -> float | None:
    """Seconds since the client last sent data (TCP_INFO), or None if unknown."""
    info = _tcp_info(conn)
    return int.from_bytes(info[52:56], sys.byteorder) / 1000 if len(info) >= 56 else None


# TCP states after the peer's FIN: TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING.
_FIN_RECEIVED = frozenset({6, 8, 9, 11})


def _byte_counts(conn: socket.socket) -> tuple[int, int] | None:
    """(bytes received, bytes sent and acknowledged) from TCP_INFO, or None."""
    info = _tcp_info(conn)
    if len(info) < 136:  # tcpi_bytes_acked (offset 120) and tcpi_bytes_received (128)
        return None
    received = int.from_bytes(info[128:136], sys.byteorder)
    # The peer's FIN takes a sequence number and is counted as a byte: take
    # it off once the state (tcpi_state, byte 0) says it has arrived.
    if info[0] in _FIN_RECEIVED:
        received -= 1
    return received, int.from_bytes(info[120:128], sys.byteorder)


def _access_line(
    family: int, peer: Any, duration: float, counts: tuple[int, int | None] | None, status: int
) -> None:
    from . import log

    peer_text = format_address(family, peer)
    got, sent = counts if counts is not None else ("-", "-")
    sent = "-" if sent is None else sent
    log.get_logger("forkserver.access").record(
        "%s pid %d %.3fs in %s out %s exit status %d",
        peer_text, os.getpid(), duration, got, sent, status,
        peer=peer_text, pid=os.getpid(), duration=round(duration, 6),
        bytes_in=counts[0] if counts else None, bytes_out=counts[1] if counts else None,
        status=f"exit status {status}",
    )  # fmt: skip


# The write end of the parent's exit-notes pipe (children.py), or -1; set by
# the parent before it forks, so every child has it.  Non-blocking: a full
# pipe (a parent far behind) only costs the parent a walk of its children.
# A reload hands the pipe to the re-executed parent, so it always has a reader
# while the parent lives.
exit_notes = -1


def set_exit_notes(fd: int) -> None:
    """In the parent: children will note their exit on *fd*; -1 closes the
    current one and stops the notes."""
    global exit_notes
    if exit_notes >= 0:
        os.close(exit_notes)
    exit_notes = fd


def leave(status: int) -> NoReturn:
    """End the child: never return into the parent's loop, never run its atexit."""
    # Flush what the handler print()ed: os._exit skips interpreter cleanup.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass  # a closed or broken stream: nothing more can be said
    if exit_notes >= 0:
        try:  # 4 bytes: atomic, so the parent never reads half a pid
            os.write(exit_notes, os.getpid().to_bytes(4, sys.byteorder))
        except OSError:
            pass  # the parent will find this exit by walking its children
    os._exit(status)


def serve_connection(
    fd: int,
    family: int,
    peer: Any,
    parent_fds: Iterable[int],
    signals: tuple[int, ...],
    run: Callable[[socket.socket, Any], None],
    on_error: Callable[[socket.socket, Any], None],
    limits: ChildLimits | None = None,
    service: Service | None = None,
) -> NoReturn:
    """Become the child for connection *fd* (forked on accept); never returns."""
    status = 1
    try:
        detach_from_parent(parent_fds, signals)  # before any user code runs
        if limits is not None:
            limits.apply_to_process()  # an OSError here means: never run the handler
        status = serve(fd, family, peer, run, on_error, limits, service)
    except Exception:
        setup_failed(family, peer)
    finally:
        leave(status)


def answer(
    fd: int,
    data: bytes,
    family: int,
    peer: Any,
    run: Callable[[Any, Any], None],
    on_error: Callable[[socket.socket, Any], None],
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
        on_error(sock, peer)
    finally:
        sock.close()
    if started:
        _access_line(family, peer, time.monotonic() - started, (len(data), None), status)
    return status


def serve_datagram(
    fd: int,
    data: bytes,
    family: int,
    peer: Any,
    parent_fds: Iterable[int],
    signals: tuple[int, ...],
    run: Callable[[Any, Any], None],
    on_error: Callable[[socket.socket, Any], None],
    limits: ChildLimits | None = None,
) -> NoReturn:
    """Become the child for one datagram (socketserver's ForkingUDPServer);
    never returns.  *fd* is the child's own duplicate of the UDP socket, taken
    before the parent's fds (the socket among them) are closed."""
    status = 1
    try:
        detach_from_parent(parent_fds, signals)
        if limits is not None:
            limits.apply_to_process()
        status = answer(fd, data, family, peer, run, on_error, limits)
    except Exception:
        setup_failed(family, peer)
    finally:
        leave(status)


def setup_failed(family: int, peer: Any) -> None:
    """The child could not get ready (drop privileges, set limits): say why."""
    from . import log

    log.get_logger(__name__).exception(
        "child for %s could not start its handler", format_address(family, peer)
    )
