"""The connection's socket when ``send_timeout`` or ``request_timeout`` is set:
deadlines for whole operations, not for each system call.

A kernel timeout (SO_SNDTIMEO) or a socket timeout bounds one ``send()``: a
``sendall()`` of 64 KiB to a client that reads a little now and then makes
many sends, each given the whole timeout (measured: ``send_timeout = 3`` cut
children 3.2 to 9.3 s after the client stalled).  :class:`Connection` keeps
one deadline per operation and gives each call what is left of it.  Only a
child whose settings ask for a deadline gets this class; the others keep a
plain socket and pay nothing.
"""

from __future__ import annotations

import io
import socket
from time import monotonic

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["Connection"]


class Connection(socket.socket):
    """A socket whose ``sendall()`` (and buffered ``makefile("wb")`` writes)
    end by ``send_timeout``, and whose reads end by the request deadline."""

    # Set by ChildLimits.apply_to_connection, after construction.
    send_timeout = 0.0
    expired: str | None = None  # why a deadline cut the connection, for the log line
    _send_deadline = 0.0  # inside a sendall() or a buffered flush: when it must end
    _request_deadline = 0.0  # while the request is read: when it must be in; 0: done
    _request_cap = 0.0
    _min_rate = 0
    _request_timeout = 0.0
    _received = 0

    def expect_request(self, timeout: float, min_rate: int, longest: float) -> None:
        """The client has *timeout* seconds from now to send its request; each
        *min_rate* bytes received extend that by one second, up to *longest*
        seconds from now (0: no cap)."""
        now = monotonic()
        self._request_timeout = timeout
        self._request_deadline = now + timeout
        self._request_cap = now + longest if longest else float("inf")
        self._min_rate = min_rate

    # -- sending ----------------------------------------------------------------

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        if self._received:
            self._request_deadline = 0.0  # the reply begins: the request is in
        if not self.send_timeout or self._send_deadline:  # no limit, or inside a flush
            return self._within(self._send_deadline, super().sendall, data, flags)  # type: ignore[no-any-return]
        # Most replies fit in the socket's buffer: one send that does not
        # wait, and no timeout to set and restore (two syscalls: 12.7 against
        # 5.1 us for a 64-byte sendall and recv on a socketpair).
        view = memoryview(data).cast("B")
        try:
            sent = super().send(view, flags | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(view):
            return None
        # CPython's sendall() with a timeout treats it as a deadline for the
        # whole call (since 3.5; measured: 1.14 s for timeout=1.0 against a
        # reader taking 4 KiB every 50 ms), so one settimeout() is enough.
        self._send_deadline = monotonic() + self.send_timeout
        try:
            self._within(self._send_deadline, super().sendall, view[sent:], flags)
        finally:
            self._send_deadline = 0.0
        return None

    def send(self, data: ReadableBuffer, flags: int = 0, /) -> int:
        if self._received:
            self._request_deadline = 0.0  # the reply begins: the request is in
        deadline = self._send_deadline or (
            monotonic() + self.send_timeout if self.send_timeout else 0.0
        )
        return self._within(deadline, super().send, data, flags)  # type: ignore[no-any-return]

    def _within(self, deadline: float, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` with the socket's timeout cut to what is left before *deadline*."""
        if not deadline:
            return call(*args)
        own = self.gettimeout()
        left = deadline - monotonic()
        if own is not None and own <= left:
            return call(*args)  # the handler's own timeout comes first
        if left <= 0:
            self._send_expired()
        self.settimeout(left)
        try:
            return call(*args)
        except TimeoutError:
            self._send_expired()
        finally:
            self.settimeout(own)

    def _send_expired(self) -> None:
        self.expired = f"send_timeout ({self.send_timeout:g}s) expired: the client is not reading"
        raise TimeoutError("send_timeout expired")

    def makefile(self, mode: str = "r", buffering: int | None = None, **kwargs: Any) -> Any:
        """As socket's, but a buffered binary writer's write and flush share
        one send_timeout deadline, like sendall()."""
        if not self.send_timeout or set(mode) - {"w", "b"} or buffering == 0 or kwargs:
            return super().makefile(mode, buffering, **kwargs)  # type: ignore[call-overload]
        raw = socket.SocketIO(self, "wb")
        self._io_refs += 1  # type: ignore[attr-defined]
        size = buffering if buffering is not None and buffering > 0 else io.DEFAULT_BUFFER_SIZE
        return _Writer(raw, size, self)

    # -- receiving the request ------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        if not self._request_deadline:
            return super().recv(bufsize, flags)
        data: bytes = self._reading(super().recv, bufsize, flags)
        self._got(len(data))
        return data

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0, /) -> int:
        if not self._request_deadline:
            return super().recv_into(buffer, nbytes, flags)
        n: int = self._reading(super().recv_into, buffer, nbytes, flags)
        self._got(n)
        return n

    def _reading(self, call: Callable[..., Any], *args: Any) -> Any:
        own = self.gettimeout()
        left = self._request_deadline - monotonic()
        if own is not None and own <= left:
            return call(*args)
        if left <= 0:
            self._request_expired()
        self.settimeout(left)
        try:
            return call(*args)
        except TimeoutError:
            self._request_expired()
        finally:
            self.settimeout(own)

    def _got(self, n: int) -> None:
        self._received += n
        if self._min_rate and n:
            extended = self._request_deadline + n / self._min_rate
            self._request_deadline = min(extended, self._request_cap)

    def _request_expired(self) -> None:
        how = f" at under {self._min_rate} bytes/s" if self._min_rate else ""
        self.expired = (
            f"request_timeout ({self._request_timeout:g}s) expired: the client sent "
            f"{self._received} bytes{how} and no complete request"
        )
        raise TimeoutError("request_timeout expired")


class _Writer(io.BufferedWriter):
    """makefile("wb")'s writer, each write and flush under one send deadline."""

    def __init__(self, raw: Any, size: int, conn: Connection) -> None:
        super().__init__(raw, size)
        self._conn = conn

    def write(self, data: ReadableBuffer, /) -> int:
        return self._deadline(super().write, data)  # type: ignore[no-any-return]

    def flush(self) -> None:
        self._deadline(super().flush)

    def _deadline(self, call: Callable[..., Any], *args: Any) -> Any:
        conn = self._conn
        if conn._send_deadline:
            return call(*args)
        conn._send_deadline = monotonic() + conn.send_timeout
        try:
            return call(*args)
        finally:
            conn._send_deadline = 0.0
